//! `ipsec-mesh-ipam`: CNI IPAM plugin allocating from this host's mesh subnets (see
//! `ipsec_mesh::cni`).

fn main() -> std::process::ExitCode {
    ipsec_mesh::cni::plugin::main(&ipsec_mesh::cni::ipam::Ipam)
}
