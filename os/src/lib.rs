//! sealvm-os: what every sealvm binary needs from the host OS, each done one way.
//!
//! [`api_socket`] is the JSON-lines protocol of the API sockets (the answer envelope, error
//! codes, the request line limit, the serving loop and the client); [`lock`] takes `flock` locks; [`durable`] replaces files so a crash leaves the old or the
//! new contents, never a mix, and returns every error (a lost directory sync is an error);
//! [`socket`] binds unix sockets without ever deleting a file that is not a socket or
//! stealing a socket that something still serves; [`signals`] catches SIGTERM and SIGINT
//! and hands them to a binary's reaction on a thread; [`main_setup`] gives the four binaries
//! one way to log, print errors and exit; [`mutate`] damages inputs for the decoders'
//! seeded mutation runs. It deliberately holds nothing about VMs, disks or
//! journals.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod api_socket;
pub mod durable;
pub mod lock;
pub mod main_setup;
pub mod mutate;
pub mod signals;
pub mod socket;
