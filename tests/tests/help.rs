//! What --help tells a user.

use tcprtt_tests::kit::run;

#[test]
fn help_shows_examples() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    assert!(out.stdout.contains("Examples:"), "{}", out.stdout);
    assert!(out.stdout.contains("--byraddr"), "{}", out.stdout);
}
