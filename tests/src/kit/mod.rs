//! The kit every end-to-end test is built from: the binary under test and how to run it
//! ([`run`], [`Tracer`]), real TCP traffic ([`EchoServer`], [`Conn`], [`ping_pong`]),
//! what tcprtt printed ([`parse_histograms`]) and what it left in the kernel
//! ([`Loaded`]).
//!
//! Every process and thread a helper starts is owned by a guard that ends it when
//! dropped, so a failing or panicking test leaves nothing running.

mod echo;
mod kernel;
mod output;
mod tracer;
mod traffic;

pub use echo::EchoServer;
pub use kernel::{Loaded, new_orphans, orphans};
pub use output::{Printed, labels, parse_histograms};
pub use tracer::{
    Finished, Tracer, as_nobody, assert_one_line_error, bin, no_ebpf_bin, run, run_command,
    run_within, try_run_within, wait_for,
};
pub use traffic::{Conn, Load, ip, ping_pong, ping_pong_parallel, round_trips_each, sock_addr};
