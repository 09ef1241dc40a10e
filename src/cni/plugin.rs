//! The plugin edge: read `CNI_*` and stdin, run the command, print the result or the error
//! object on stdout, exit 0 or 1. A panic is caught and reported as an error object (code
//! [`code::INTERNAL`]), so the runtime always gets JSON. Logs go to stderr (filter:
//! `$IPSEC_MESH_LOG`, default `warn`).

use std::io::{Read, Write};
use std::process::ExitCode;

use serde_json::Value;

use super::config::{Command, Env, NetConf};
use super::spec::{self, code, CniError, CniResult};

/// One invocation, parsed.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub env: &'a Env,
    pub conf: &'a NetConf,
    /// stdin as given (what a delegated plugin gets).
    pub stdin: &'a [u8],
}

/// What a plugin does for each command (VERSION is answered by the edge).
pub trait Plugin {
    fn add(&self, r: &Request) -> Result<CniResult, CniError>;
    fn del(&self, r: &Request) -> Result<(), CniError>;
    fn check(&self, r: &Request) -> Result<(), CniError>;
    fn gc(&self, r: &Request) -> Result<(), CniError>;
    fn status(&self, r: &Request) -> Result<(), CniError>;
}

/// What to print and whether it is a success.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// JSON to print on stdout (empty: print nothing).
    pub stdout: String,
    pub success: bool,
}

impl Outcome {
    fn ok(v: Option<Value>) -> Outcome {
        Outcome {
            stdout: v.map(|v| v.to_string()).unwrap_or_default(),
            success: true,
        }
    }

    fn err(e: &CniError, version: &str) -> Outcome {
        Outcome {
            stdout: e.to_json(version).to_string(),
            success: false,
        }
    }
}

/// Run one command (everything but the process I/O: testable).
pub fn dispatch(
    plugin: &dyn Plugin,
    get: impl Fn(&str) -> Option<String>,
    stdin: &[u8],
) -> Outcome {
    let version = NetConf::sniff_version(stdin).unwrap_or_else(|| spec::LATEST.to_string());
    let env = match Env::from_vars(get) {
        Ok(e) => e,
        Err(e) => return Outcome::err(&e, &version),
    };
    if env.command == Command::Version {
        let requested = serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string));
        return Outcome::ok(Some(spec::version_json(requested.as_deref())));
    }
    let conf = match NetConf::parse(stdin) {
        Ok(c) => c,
        Err(e) => return Outcome::err(&e, &version),
    };
    if env.command == Command::Check && !spec::at_least(&conf.cni_version, (0, 4, 0)) {
        let e = CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "CHECK needs cniVersion 0.4.0 or later, not {}",
                conf.cni_version
            ),
        );
        return Outcome::err(&e, &version);
    }
    let req = Request {
        env: &env,
        conf: &conf,
        stdin,
    };
    tracing::debug!(command = env.command.as_str(), container = %env.container_id, ifname = %env.ifname, "cni request");
    let r = match env.command {
        Command::Add => plugin
            .add(&req)
            .map(|res| Some(res.to_json(&conf.cni_version))),
        Command::Del => plugin.del(&req).map(|()| None),
        Command::Check => plugin.check(&req).map(|()| None),
        Command::Gc => plugin.gc(&req).map(|()| None),
        Command::Status => plugin.status(&req).map(|()| None),
        Command::Version => Ok(None),
    };
    match r {
        Ok(v) => Outcome::ok(v),
        Err(e) => {
            tracing::warn!(command = env.command.as_str(), container = %env.container_id, "{e}");
            Outcome::err(&e, &conf.cni_version)
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let spec = std::env::var("IPSEC_MESH_LOG").unwrap_or_else(|_| "warn".to_string());
    let spec = format!("netlink_proto=warn,netlink_sys=warn,rtnetlink=warn,{spec}");
    let filter = EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// The `main` of a plugin binary.
pub fn main(plugin: &dyn Plugin) -> ExitCode {
    init_logging();
    let mut stdin = Vec::new();
    let out = match std::io::stdin().read_to_end(&mut stdin) {
        Err(e) => Outcome::err(
            &CniError::new(code::IO, format!("cannot read stdin: {e}")),
            spec::LATEST,
        ),
        Ok(_) => {
            let run = std::panic::AssertUnwindSafe(|| {
                dispatch(plugin, |k| std::env::var(k).ok(), &stdin)
            });
            std::panic::catch_unwind(run).unwrap_or_else(|p| {
                let what = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                Outcome::err(
                    &CniError::new(
                        code::INTERNAL,
                        "internal error (a bug): the plugin panicked",
                    )
                    .with_details(what),
                    &NetConf::sniff_version(&stdin).unwrap_or_else(|| spec::LATEST.to_string()),
                )
            })
        }
    };
    let mut so = std::io::stdout().lock();
    if !out.stdout.is_empty() {
        let _ = writeln!(so, "{}", out.stdout);
    }
    let _ = so.flush();
    if out.success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::HashMap;

    struct Fake;

    impl Plugin for Fake {
        fn add(&self, r: &Request) -> Result<CniResult, CniError> {
            if r.env.container_id == "boom" {
                return Err(CniError::new(code::TRY_AGAIN, "later"));
            }
            Ok(CniResult {
                ips: vec![spec::IpConfig {
                    address: "10.42.1.2/24".parse().unwrap(),
                    gateway: None,
                    interface: None,
                    version: None,
                }],
                ..Default::default()
            })
        }
        fn del(&self, _: &Request) -> Result<(), CniError> {
            Ok(())
        }
        fn check(&self, _: &Request) -> Result<(), CniError> {
            Ok(())
        }
        fn gc(&self, _: &Request) -> Result<(), CniError> {
            Ok(())
        }
        fn status(&self, _: &Request) -> Result<(), CniError> {
            Err(CniError::new(code::NOT_AVAILABLE, "no"))
        }
    }

    fn run(cmd: &str, container: &str, stdin: &str) -> (Value, bool) {
        let m: HashMap<&str, &str> = [
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", container),
            ("CNI_NETNS", "/x"),
            ("CNI_IFNAME", "eth0"),
        ]
        .into_iter()
        .collect();
        let o = dispatch(&Fake, |k| m.get(k).map(|s| s.to_string()), stdin.as_bytes());
        let v = if o.stdout.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&o.stdout).unwrap()
        };
        (v, o.success)
    }

    const CONF: &str = r#"{"cniVersion":"0.4.0","name":"n","type":"t"}"#;

    #[test]
    fn add_prints_the_result_in_the_config_version() {
        let (v, ok) = run("ADD", "c", CONF);
        assert!(ok);
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["ips"][0]["version"], "4");
    }

    #[test]
    fn errors_are_json_with_code_and_msg() {
        let (v, ok) = run("ADD", "boom", CONF);
        assert!(!ok);
        assert_eq!(
            v,
            json!({"cniVersion": "0.4.0", "code": 11, "msg": "later"})
        );
        let (v, ok) = run("ADD", "c", "{not json");
        assert!(!ok);
        assert_eq!(v["code"], 6);
        assert_eq!(v["cniVersion"], spec::LATEST);
        let (v, _) = run("ADD", "", CONF);
        assert_eq!(v["code"], 4);
        let (v, _) = run("STATUS", "", CONF);
        assert_eq!(v["code"], 50);
    }

    #[test]
    fn version_needs_no_config() {
        let (v, ok) = run("VERSION", "", "");
        assert!(ok);
        assert_eq!(v["cniVersion"], spec::LATEST);
        assert!(v["supportedVersions"].as_array().unwrap().len() >= 3);
        let (v, _) = run("VERSION", "", r#"{"cniVersion":"1.0.0"}"#);
        assert_eq!(v["cniVersion"], "1.0.0");
    }

    #[test]
    fn del_prints_nothing_and_check_needs_0_4() {
        let (v, ok) = run("DEL", "c", CONF);
        assert!(ok && v.is_null());
        let (v, ok) = run("CHECK", "c", &CONF.replace("0.4.0", "0.3.1"));
        assert!(!ok);
        assert_eq!(v["code"], 1);
    }
}
