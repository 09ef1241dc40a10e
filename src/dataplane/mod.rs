//! Dataplane drivers: each owns a namespace of kernel objects (recognisable reqid range,
//! mark bits, chain names, rule priority and table) and never touches anything else.
//! A reconcile dumps what exists, diffs against the desired state and applies only the
//! difference.

pub mod assemble;
pub mod charon;
pub mod driver;
pub mod firewall;
pub mod netns;
pub mod notify;
pub mod report;
pub mod routes;
pub mod rtnl;
pub mod sysctl;
pub mod vxlan;
pub mod xfrm;
pub mod xfrmi;
