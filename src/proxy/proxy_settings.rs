//! The proxy-wide settings kept in Consul KV: `<kv-prefix>/settings/maxconn` and
//! `<kv-prefix>/settings/timeouts/<connect|client|server|queue|tunnel|http-request|http-keep-alive>`
//! (consul-template's `service/haproxy/maxconn` habit).
//!
//! They arrive with every read of the stored-specs watch (one blocking query on `<kv-prefix>/`)
//! and override the flags key by key; a key that is removed gives its setting back to the flag
//! (or the default). A value that does not validate is logged once per version and ignored (the
//! flag applies for that key), so it never takes the proxy down nor holds other changes back.
//! Timeouts in KV need a unit (`30s`, `500ms`): HAProxy reads a bare number as milliseconds,
//! Docker Flow Proxy's `TIMEOUT_*` as seconds, so a bare number is refused rather than guessed.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::registry::KvEntry;
use crate::render::ProxyWide;
use crate::settings::ProxyWideFlags;
use crate::spec::proxy_wide::parse_maxconn;
use crate::spec::{HaproxyTime, TimeoutName};

/// The settings' folder below `<kv-prefix>/`.
pub(super) const SETTINGS_FOLDER: &str = "settings/";

/// The key of `maxconn`, below [`SETTINGS_FOLDER`].
const MAXCONN_KEY: &str = "maxconn";

/// The folder of the timeouts, below [`SETTINGS_FOLDER`].
const TIMEOUTS_FOLDER: &str = "timeouts/";

/// The settings one read of `<kv-prefix>/settings/` holds (only the values that validate).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct KvSettings {
    pub maxconn: Option<u32>,
    pub timeouts: BTreeMap<TimeoutName, HaproxyTime>,
}

impl KvSettings {
    /// Takes in one entry whose key is `relative` below `<kv-prefix>/settings/`. A value that
    /// does not validate, or a key that names no setting, is logged (once per version, kept in
    /// `reported`) and ignored.
    pub fn read_entry(
        &mut self,
        relative: &str,
        entry: &KvEntry,
        reported: &mut BTreeSet<(String, u64)>,
    ) {
        let text = String::from_utf8_lossy(&entry.value);
        let value = text.trim();
        let problem = if relative == MAXCONN_KEY {
            match parse_maxconn(value) {
                Ok(maxconn) => {
                    self.maxconn = Some(maxconn);
                    return;
                }
                Err(error) => error.to_string(),
            }
        } else if let Some(name) = relative.strip_prefix(TIMEOUTS_FOLDER) {
            match TimeoutName::from_name(name) {
                Some(timeout) => match HaproxyTime::parse(value) {
                    Ok(time) => {
                        self.timeouts.insert(timeout, time);
                        return;
                    }
                    Err(error) => error.to_string(),
                },
                None => format!(
                    "no such timeout; the keys are timeouts/{}",
                    TimeoutName::ALL.map(TimeoutName::as_str).join("|")
                ),
            }
        } else {
            format!(
                "no such setting; the keys are {MAXCONN_KEY} and {TIMEOUTS_FOLDER}<{}>",
                TimeoutName::ALL.map(TimeoutName::as_str).join("|")
            )
        };
        if reported.insert((entry.key.clone(), entry.modify_index)) {
            tracing::error!(
                key = %entry.key,
                %problem,
                "ignoring a proxy-wide setting in Consul KV that does not validate; the flag's value applies"
            );
        }
    }

    /// The settings in force: `flags`, with every key of these settings overriding its flag.
    pub fn over(&self, flags: &ProxyWide) -> ProxyWide {
        let mut settings = flags.clone();
        if let Some(maxconn) = self.maxconn {
            settings.maxconn = maxconn;
        }
        for (name, time) in &self.timeouts {
            settings.timeouts.insert(*name, *time);
        }
        settings
    }
}

/// Where a setting in force came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SettingSource {
    /// flow-proxy's default (no flag, no KV key).
    Default,
    /// The flag or its environment variable.
    Flag,
    /// A key in Consul KV.
    ConsulKv,
}

/// One setting in force, for `GET /v1/docker-flow-proxy/settings`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EffectiveSetting {
    /// `maxconn` or `timeout <name>`.
    pub name: String,
    /// The value HAProxy runs with (`None`: left to HAProxy, for `timeout queue`).
    pub value: Option<String>,
    pub source: SettingSource,
    /// The Consul KV key that can override it.
    pub key: String,
}

/// Every KV-backed setting in force, with its source, given the flags, the values they make
/// and the KV settings applied.
pub(super) fn effective(
    flags: &ProxyWideFlags,
    from_flags: &ProxyWide,
    kv: &KvSettings,
    kv_prefix: &str,
) -> Vec<EffectiveSetting> {
    let folder = format!("{}/{SETTINGS_FOLDER}", kv_prefix.trim_end_matches('/'));
    let source = |in_kv: bool, flag_given: bool| match (in_kv, flag_given) {
        (true, _) => SettingSource::ConsulKv,
        (false, true) => SettingSource::Flag,
        (false, false) => SettingSource::Default,
    };
    let mut settings = vec![EffectiveSetting {
        name: "maxconn".to_string(),
        value: Some(kv.maxconn.unwrap_or(from_flags.maxconn).to_string()),
        source: source(kv.maxconn.is_some(), flags.maxconn.is_some()),
        key: format!("{folder}{MAXCONN_KEY}"),
    }];
    for name in TimeoutName::ALL {
        let value = kv
            .timeouts
            .get(&name)
            .or_else(|| from_flags.timeouts.get(&name));
        settings.push(EffectiveSetting {
            name: format!("timeout {}", name.as_str()),
            value: value.map(ToString::to_string),
            source: source(
                kv.timeouts.contains_key(&name),
                flags.timeout(name).is_some(),
            ),
            key: format!("{folder}{TIMEOUTS_FOLDER}{}", name.as_str()),
        });
    }
    settings
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, value: &str, modify_index: u64) -> KvEntry {
        KvEntry {
            key: format!("flow-proxy/settings/{key}"),
            value: value.as_bytes().to_vec(),
            modify_index,
        }
    }

    fn read(entries: &[(&str, &str)]) -> (KvSettings, BTreeSet<(String, u64)>) {
        let mut settings = KvSettings::default();
        let mut reported = BTreeSet::new();
        for (index, (key, value)) in entries.iter().enumerate() {
            settings.read_entry(key, &entry(key, value, index as u64 + 1), &mut reported);
        }
        (settings, reported)
    }

    #[test]
    fn kv_values_are_read_key_by_key_and_bad_ones_are_reported_and_left_out() {
        let (settings, reported) = read(&[
            ("maxconn", "2000\n"),
            ("timeouts/server", "30s"),
            ("timeouts/connect", "5000"),
            ("timeouts/nap", "1s"),
            ("colour", "blue"),
        ]);
        assert_eq!(settings.maxconn, Some(2000));
        assert_eq!(
            settings.timeouts.keys().copied().collect::<Vec<_>>(),
            [TimeoutName::Server]
        );
        let keys: Vec<&str> = reported.iter().map(|(key, _)| key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "flow-proxy/settings/colour",
                "flow-proxy/settings/timeouts/connect",
                "flow-proxy/settings/timeouts/nap"
            ]
        );
    }

    #[test]
    fn kv_settings_override_the_flags_key_by_key_and_say_where_each_came_from() {
        let flags = ProxyWideFlags {
            maxconn: Some(500),
            timeout_client: Some("30".parse().unwrap()),
            ..ProxyWideFlags::default()
        };
        let from_flags = flags.proxy_wide();
        let (kv, _) = read(&[("timeouts/client", "45s"), ("timeouts/queue", "2s")]);
        let in_force = kv.over(&from_flags);
        assert_eq!(in_force.maxconn, 500);
        assert_eq!(in_force.timeouts[&TimeoutName::Client].to_string(), "45s");
        assert_eq!(in_force.timeouts[&TimeoutName::Queue].to_string(), "2s");
        assert_eq!(in_force.timeouts[&TimeoutName::Server].to_string(), "60s");

        let shown = effective(&flags, &from_flags, &kv, "flow-proxy/");
        let find = |name: &str| {
            shown
                .iter()
                .find(|setting| setting.name == name)
                .cloned()
                .unwrap()
        };
        let maxconn = find("maxconn");
        assert_eq!(
            (maxconn.value.as_deref(), maxconn.source),
            (Some("500"), SettingSource::Flag)
        );
        assert_eq!(maxconn.key, "flow-proxy/settings/maxconn");
        let client = find("timeout client");
        assert_eq!(
            (client.value.as_deref(), client.source),
            (Some("45s"), SettingSource::ConsulKv)
        );
        let server = find("timeout server");
        assert_eq!(
            (server.value.as_deref(), server.source),
            (Some("60s"), SettingSource::Default)
        );
        let unset = effective(&flags, &from_flags, &KvSettings::default(), "flow-proxy");
        let queue = unset
            .iter()
            .find(|setting| setting.name == "timeout queue")
            .unwrap();
        assert_eq!(
            (queue.value.as_deref(), queue.source),
            (None, SettingSource::Default)
        );
        assert_eq!(queue.key, "flow-proxy/settings/timeouts/queue");
    }
}
