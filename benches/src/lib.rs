//! weft-bench: measures what a Weft proxy hop costs, against a no-proxy
//! baseline and HAProxy, in one run on one machine.
//!
//! # Method
//!
//! **Open loop at a constant rate.** A closed-loop client (send, wait, send
//! again) slows down when the system under test slows down, so it never
//! sees the queue it would have built: the "coordinated omission" problem.
//! Here request `i` is *intended* at `t0 + i/R` whatever happened before
//! it. Each connection (or HTTP/2 stream slot) takes the next ticket from
//! one shared schedule when it is free; if every slot is busy the ticket
//! waits, and its latency still counts from its intended time
//! ([`load::schedule`]). This is the correction wrk2 and oha apply.
//!
//! **What is the generator's own fault is not counted.** tokio's timer has
//! a 1 ms granularity, so a free slot wakes up to ~1 ms after the intended
//! time. When a ticket was picked up *before* its intended time, that
//! lateness belongs to the generator, not the system under test, and the
//! latency counts from the actual send instead; the lateness is reported
//! separately as `schedule lag`. A ticket picked up *after* its intended
//! time (every slot was busy) counts from the intended time.
//!
//! **Latency** is recorded in an HDR histogram with microsecond resolution
//! and three significant digits; the report gives p50, p90, p99, p99.9 and
//! max, the achieved rate and errors (transport errors, non-2xx statuses,
//! `grpc-status` other than 0, bodies of the wrong length).
//!
//! **Max throughput** is a separate closed-loop run: every slot sends back
//! to back for a fixed time, and the report gives requests per second.
//!
//! **CPU pinning.** On a two-core machine the load generator runs on CPU 0
//! and the bench server, every proxy and HAProxy on CPU 1
//! (`sched_setaffinity` before `exec`, see [`sys::affinity`]). Each scenario
//! then has the same number of cross-core hops (one each way), and a proxy
//! competes with the server for one core, as a sidecar does with its
//! application. The server runs as a child process (`weft-bench server`)
//! so that it can be pinned.
//!
//! **Cost per hop.** For every proxy process the runner reads utime+stime
//! from `/proc/<pid>/stat` at the start and end of the measured window and
//! divides by the requests completed in it (µs of CPU per request per hop),
//! and samples `VmRSS` from `/proc/<pid>/status` before the load (idle) and
//! during it (peak of the samples), see [`sys::procfs`].
//!
//! # Layout
//!
//! - [`load`]: the generator: [`load::schedule`] (the pure open-loop
//!   schedule and the slot loop), [`load::http`] (HTTP/1.1, HTTP/2 and gRPC
//!   over hyper's connection-level client, exact connection counts),
//!   [`load::stats`] (percentiles).
//! - [`server`]: the bench server (HTTP/1.1 and HTTP/2 with one port, gRPC
//!   echo).
//! - [`grpc`]: the five-byte gRPC message framing both sides share.
//! - [`scenario`]: spawns the server, proxies and HAProxy and runs the
//!   scenarios; [`report`] turns the results into `RESULTS.md` and JSON.
//! - [`sys`]: CPU affinity and `/proc` parsers.
//! - [`balance`]: `weft-bench balance`, the load balancer's quality (BALANCE.md).
//! - [`handshake`]: `weft-bench handshakes`, new mutual-TLS connections per proxy
//!   core-second against plaintext and HAProxy.
//! - [`policy`]: `weft-bench retries`, `ejection` and `routing-cost`, the traffic-policy
//!   figures of issue 12 (retries within a budget, circuit breaking, the cost of routing),
//!   each against a baseline in the same run, with fault-injecting servers ([`server::Fault`]).
//! - [`scenario::mesh`]: a controller with a development CA and the manifests the
//!   `weft2-disc` / `weft2-mtls` scenarios and `handshakes` share.

pub mod balance;
pub mod cli;
pub mod cluster_ip;
pub mod cross_node;
pub mod grpc;
pub mod handshake;
pub mod load;
pub mod netpol;
pub mod policy;
pub mod report;
pub mod scenario;
pub mod server;
pub mod sys;
pub mod tracing_cost;
