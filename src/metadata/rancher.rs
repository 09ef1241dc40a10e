//! rancher-metadata HTTP source (placeholder: being written).
use super::{MetadataError, MetadataSource, Snapshot};
use std::time::Duration;

pub struct RancherSource {
    url: String,
}
impl RancherSource {
    pub fn new(url: &str) -> Result<RancherSource, MetadataError> {
        Ok(RancherSource {
            url: url.to_string(),
        })
    }
}
impl MetadataSource for RancherSource {
    fn origin(&self) -> String {
        self.url.clone()
    }
    fn load(&mut self) -> Result<Snapshot, MetadataError> {
        Err(MetadataError::Rancher {
            url: self.url.clone(),
            message: "not yet".into(),
        })
    }
    fn wait_for_change(&mut self, _v: &str, _m: Duration) -> Result<Option<String>, MetadataError> {
        Ok(None)
    }
}
