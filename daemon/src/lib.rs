//! potluck-daemon: the I/O shell of Potluck and the `potluck` binary. `node` starts a daemon
//! (identity, network, control API); `net` is the libp2p event loop and its `Client` handle;
//! `cli` is the command line (`sample` is `potluck sample`, text from a model on disk); `config`, `identity`, `capability`, `membership`, `gate`,
//! `limits`, `bootstrap`, `ratelimit`, `threads` and `wire` are the pieces they are built from; `web` serves the
//! metrics (`metrics`), the JSON state and the dashboard.

pub mod bootstrap;
pub mod capability;
pub mod ckpt_transfer;
pub mod cli;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod fsutil;
pub mod gate;
pub mod identity;
pub mod limits;
pub mod membership;
pub mod metrics;
pub mod net;
pub mod node;
pub mod ratelimit;
pub mod sample;
pub mod threads;
pub mod train;
pub mod web;
pub mod wire;

pub use config::Config;
pub use net::Client;
pub use node::Node;
