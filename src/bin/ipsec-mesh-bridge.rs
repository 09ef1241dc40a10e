//! `ipsec-mesh-bridge`: CNI bridge plugin for the ipsec-mesh overlay (see `ipsec_mesh::cni`).

fn main() -> std::process::ExitCode {
    ipsec_mesh::cni::plugin::main(&ipsec_mesh::cni::bridge::Bridge)
}
