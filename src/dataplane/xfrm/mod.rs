//! Kernel XFRM driver (IKE-less): policies and ESP SAs from the plan, over netlink.

pub mod desired;
pub mod messages;
pub mod objects;
pub mod reconcile;
pub mod socket;
