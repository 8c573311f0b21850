//! fleetctl as operators run it: key and manifest files, the API of a real control plane, and
//! remote commands to a real agent. One test binary, so it is linked once.

mod api;
mod cli;
mod remote;
