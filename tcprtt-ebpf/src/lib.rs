// Only here so that `tcprtt` can name this crate as a build dependency; the program is
// the `tcprtt` binary target in main.rs.
#![no_std]
