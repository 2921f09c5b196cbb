//! tcprtt's end-to-end tests run the built binary against the running kernel with real
//! TCP traffic. [`kit`] has what every test uses; [`testbed`] adds hosts in network
//! namespaces joined by delay lines, for traffic with real, known round-trip times.

pub mod kit;
pub mod testbed;
