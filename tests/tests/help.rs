//! What --help tells a user.

use tcprtt_tests::kit::run;

#[test]
fn help_shows_examples() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    assert!(out.stdout.contains("Examples:"), "{}", out.stdout);
    assert!(out.stdout.contains("--byraddr"), "{}", out.stdout);
}

/// --by-flow keys connections by their 4-tuple only: --help must say that identical
/// 4-tuples in different network namespaces share a row.
#[test]
fn help_says_by_flow_merges_network_namespaces() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    assert!(out.stdout.contains("network namespaces"), "{}", out.stdout);
}
