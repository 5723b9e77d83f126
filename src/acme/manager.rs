//! The ordering loop: every `--acme-check-interval` it lists the domains that need a
//! certificate (`letsEncrypt=true` services' exact domains, or every exact domain with
//! `--acme-all-domains`), and orders one for each domain without a valid certificate or whose
//! ACME certificate is past two thirds of its lifetime. Each order runs in a task of its own,
//! under a KV lease, so a slow or failing domain never holds up another one or any reconfigure;
//! a failed domain is retried with exponential backoff and reported on the [`AcmeBoard`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use instant_acme::{
    Account, AccountBuilder, AuthorizationStatus, ChallengeType, Identifier, Key, NewOrder,
    OrderStatus, RetryPolicy,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

use super::responder::challenges_prefix;
use super::{AcmeError, AcmeFlags};
use crate::certs::{CertInfo, Certificate};
use crate::proxy::Proxy;
use crate::registry::ConsulClient;
use crate::spec::acme::acme_domains;

/// The certificate store name of a domain's ACME certificate.
pub fn certificate_name(domain: &str) -> String {
    format!("{CERTIFICATE_PREFIX}{domain}")
}

/// The names of the certificates ACME stores begin with this.
pub const CERTIFICATE_PREFIX: &str = "acme.";

/// How long a lease lets one proxy order a domain before another may try.
const LEASE: Duration = Duration::from_secs(10 * 60);
/// Longest delay between two attempts for a failing domain.
const MAX_BACKOFF: Duration = Duration::from_secs(6 * 60 * 60);

/// The least wait after the ACME server said a rate limit was reached (`rateLimited`, or HTTP
/// 429): Let's Encrypt's limits are counted per hour or per week, so retrying sooner only
/// fails again and counts against the account.
const RATE_LIMITED_BACKOFF: Duration = Duration::from_secs(60 * 60);
/// The first retry of a failed domain waits this many check intervals (5 minutes by default),
/// then twice as long each time: at most four failed validations of a domain in any hour,
/// under Let's Encrypt's limit of five.
const RETRY_INTERVALS: u32 = 5;
/// How long the ACME server gets to validate and issue.
const ORDER_TIMEOUT: Duration = Duration::from_secs(90);

/// What flow-proxy knows of one ACME domain: shown in `GET /certs` (`Acme`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct AcmeDomainStatus {
    /// The domain.
    pub domain: String,
    /// The name its certificate is stored under.
    pub cert_name: String,
    /// The last attempt this proxy made, RFC 3339 (`None`: none yet).
    pub last_attempt: Option<String>,
    /// `ok`, `error: …`, or `ordered by another proxy`.
    pub last_outcome: Option<String>,
    /// Attempts failed in a row.
    pub failures: u32,
    /// When the next attempt may happen, RFC 3339 (after a failure).
    pub next_attempt: Option<String>,
    #[serde(skip)]
    next_attempt_unix: i64,
}

/// The ACME status of every domain flow-proxy manages, shared with the API.
#[derive(Debug, Clone, Default)]
pub struct AcmeBoard {
    domains: Arc<Mutex<BTreeMap<String, AcmeDomainStatus>>>,
}

impl AcmeBoard {
    /// Every domain's status, by domain.
    pub fn snapshot(&self) -> Vec<AcmeDomainStatus> {
        match self.domains.lock() {
            Ok(domains) => domains.values().cloned().collect(),
            Err(poisoned) => poisoned.into_inner().values().cloned().collect(),
        }
    }

    fn update(&self, domain: &str, change: impl FnOnce(&mut AcmeDomainStatus)) {
        let mut domains = match self.domains.lock() {
            Ok(domains) => domains,
            Err(poisoned) => poisoned.into_inner(),
        };
        let status = domains
            .entry(domain.to_string())
            .or_insert_with(|| AcmeDomainStatus {
                domain: domain.to_string(),
                cert_name: certificate_name(domain),
                last_attempt: None,
                last_outcome: None,
                failures: 0,
                next_attempt: None,
                next_attempt_unix: 0,
            });
        change(status);
    }

    fn retain(&self, wanted: &BTreeSet<String>) {
        if let Ok(mut domains) = self.domains.lock() {
            domains.retain(|domain, _| wanted.contains(domain));
        }
    }

    fn next_attempt_unix(&self, domain: &str) -> i64 {
        self.domains
            .lock()
            .ok()
            .and_then(|domains| domains.get(domain).map(|s| s.next_attempt_unix))
            .unwrap_or(0)
    }
}

/// The running ordering loop.
pub struct AcmeManager {
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// What the ordering loop works with.
#[derive(Clone)]
struct Orderer {
    flags: AcmeFlags,
    registry: ConsulClient,
    proxy: Proxy,
    board: AcmeBoard,
    kv_prefix: String,
    /// Tells this proxy's leases apart from the others'.
    holder: String,
}

impl AcmeManager {
    /// Starts the loop; the account is read (or created) at its first order.
    pub fn start(
        flags: AcmeFlags,
        registry: ConsulClient,
        proxy: Proxy,
        kv_prefix: &str,
    ) -> AcmeManager {
        let orderer = Orderer {
            flags,
            registry,
            board: proxy.acme_board().clone(),
            proxy,
            kv_prefix: kv_prefix.trim_end_matches('/').to_string(),
            holder: format!("{:016x}", rand::random::<u64>()),
        };
        let (shutdown, stopped) = oneshot::channel();
        let task = tokio::spawn(orderer.run(stopped));
        AcmeManager { shutdown, task }
    }

    /// Stops the loop and every order in flight.
    pub async fn stop(self) {
        let _ = self.shutdown.send(());
        let _ = self.task.await;
    }
}

impl Orderer {
    async fn run(self, mut stopped: oneshot::Receiver<()>) {
        let mut account: Option<Account> = None;
        let mut orders: JoinSet<()> = JoinSet::new();
        let in_flight: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        let mut tick = tokio::time::interval(self.flags.check_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                _ = tick.tick() => {}
                Some(_) = orders.join_next(), if !orders.is_empty() => continue,
            }
            let due = self.due_domains();
            if due.is_empty() {
                continue;
            }
            if account.is_none() {
                match self.account().await {
                    Ok(found) => account = Some(found),
                    Err(error) => {
                        tracing::error!(%error, "ACME account unavailable; no certificate is ordered");
                        // Creating an account has rate limits of its own.
                        let floor = if error.is_rate_limited() {
                            RATE_LIMITED_BACKOFF
                        } else {
                            Duration::ZERO
                        };
                        for domain in &due {
                            self.failed(domain, &error.to_string(), floor);
                        }
                        continue;
                    }
                }
            }
            let Some(account) = account.clone() else {
                continue;
            };
            for domain in due {
                let newly = in_flight
                    .lock()
                    .map(|mut set| set.insert(domain.clone()))
                    .unwrap_or(false);
                if !newly {
                    continue;
                }
                let orderer = self.clone();
                let account = account.clone();
                let in_flight = Arc::clone(&in_flight);
                orders.spawn(async move {
                    orderer.attempt(&account, &domain).await;
                    if let Ok(mut set) = in_flight.lock() {
                        set.remove(&domain);
                    }
                });
            }
        }
        orders.shutdown().await;
    }

    /// The domains that need a certificate now and are not waiting out a backoff.
    fn due_domains(&self) -> Vec<String> {
        let services = self.proxy.services();
        let mut wanted = BTreeSet::new();
        for spec in services.iter() {
            if spec.lets_encrypt() || self.flags.acme_all_domains {
                for domain in acme_domains(spec) {
                    wanted.insert(domain.host_pattern().to_string());
                }
            }
        }
        self.board.retain(&wanted);
        let certificates = self.proxy.certificates();
        let now = now_unix();
        wanted
            .into_iter()
            .filter(|domain| self.board.next_attempt_unix(domain) <= now)
            .filter(|domain| needs_certificate(&certificates, domain, now))
            .collect()
    }

    /// One attempt for `domain`: under the lease, unless another proxy holds it.
    async fn attempt(&self, account: &Account, domain: &str) {
        self.board.update(domain, |status| {
            status.last_attempt = Some(rfc3339(now_unix()));
        });
        match self.take_lease(domain).await {
            Ok(LeaseState::HeldElsewhere { outcome }) => {
                let shown = match outcome {
                    Some(outcome) => format!("ordered by another proxy: {outcome}"),
                    None => "ordered by another proxy".into(),
                };
                self.board
                    .update(domain, |status| status.last_outcome = Some(shown));
                return;
            }
            Ok(LeaseState::Taken) => {}
            Err(error) => {
                self.failed(domain, &error.to_string(), Duration::ZERO);
                return;
            }
        }
        let mut tokens = Vec::new();
        let outcome =
            tokio::time::timeout(ORDER_TIMEOUT, self.order(account, domain, &mut tokens)).await;
        // The challenges are answered or given up (also on a timeout): their keys go.
        for key in tokens {
            self.delete_key(&key).await;
        }
        let result = match outcome {
            Ok(result) => result,
            Err(_) => Err(AcmeError::Validation {
                domain: domain.to_string(),
                message: format!("no certificate within {}s", ORDER_TIMEOUT.as_secs()),
            }),
        };
        self.proxy.observer().record_acme_order(result.is_ok());
        match result {
            Ok(()) => {
                tracing::info!(domain, "ACME certificate issued and stored");
                self.board.update(domain, |status| {
                    status.last_outcome = Some("ok".into());
                    status.failures = 0;
                    status.next_attempt = None;
                    status.next_attempt_unix = 0;
                });
                // The lease stays until it expires: every proxy's certificate watch has the
                // new certificate by then, so nobody orders it again.
                let until = now_unix() + i64::try_from(LEASE.as_secs()).unwrap_or(600);
                self.hold_lease(domain, until, "ok").await;
            }
            Err(error) => {
                let message = format!("error: {error}");
                // The fleet waits out this proxy's backoff: the lease is held until the retry.
                let floor = if error.is_rate_limited() {
                    RATE_LIMITED_BACKOFF
                } else {
                    Duration::ZERO
                };
                let retry_at = self.failed(domain, &error.to_string(), floor);
                self.hold_lease(domain, retry_at, &message).await;
            }
        }
    }

    /// Records a failure of `domain` and schedules its retry, no sooner than `floor`; returns
    /// when that is due.
    fn failed(&self, domain: &str, message: &str, floor: Duration) -> i64 {
        let base = self.flags.check_interval() * RETRY_INTERVALS;
        let mut retry_at = 0;
        self.board.update(domain, |status| {
            status.failures = status.failures.saturating_add(1);
            let delay = backoff(base, status.failures).max(floor);
            let next = now_unix() + i64::try_from(delay.as_secs()).unwrap_or(i64::MAX / 2);
            tracing::warn!(
                domain,
                failures = status.failures,
                retry_in_seconds = delay.as_secs(),
                error = message,
                "ACME certificate not obtained"
            );
            status.last_outcome = Some(format!("error: {message}"));
            status.next_attempt = Some(rfc3339(next));
            status.next_attempt_unix = next;
            retry_at = next;
        });
        retry_at
    }

    /// Orders, validates, finalizes and stores a certificate for `domain`; the KV keys of the
    /// challenges it publishes are added to `tokens`.
    async fn order(
        &self,
        account: &Account,
        domain: &str,
        tokens: &mut Vec<String>,
    ) -> Result<(), AcmeError> {
        let identifiers = [Identifier::Dns(domain.to_string())];
        let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
        let mut authorizations = order.authorizations();
        let mut result = Ok(());
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization?;
            if authorization.status == AuthorizationStatus::Valid {
                continue;
            }
            let Some(mut challenge) = authorization.challenge(ChallengeType::Http01) else {
                result = Err(AcmeError::Validation {
                    domain: domain.to_string(),
                    message: "the ACME server offers no HTTP-01 challenge".into(),
                });
                break;
            };
            let token = challenge.token.clone();
            if !super::responder::is_token(&token) {
                result = Err(AcmeError::Validation {
                    domain: domain.to_string(),
                    message: "the ACME server sent a token that is not base64url".into(),
                });
                break;
            }
            let key_authorization = challenge.key_authorization().as_str().to_string();
            let key = format!("{}{token}", challenges_prefix(&self.kv_prefix));
            tokens.push(key.clone());
            self.registry
                .kv_put_cas(&key, key_authorization.into_bytes(), 0)
                .await?;
            challenge.set_ready().await?;
        }
        if result.is_ok() {
            result = self.finish(&mut order, domain).await;
        }
        result
    }

    async fn finish(&self, order: &mut instant_acme::Order, domain: &str) -> Result<(), AcmeError> {
        let retries = RetryPolicy::new().timeout(ORDER_TIMEOUT);
        let status = order.poll_ready(&retries).await?;
        if status != OrderStatus::Ready {
            let message = order
                .state()
                .error
                .as_ref()
                .map(|problem| problem.to_string())
                .unwrap_or_else(|| format!("the order is {status:?}"));
            return Err(AcmeError::Validation {
                domain: domain.to_string(),
                message,
            });
        }
        let key_pem = order.finalize().await?;
        let chain_pem = order.poll_certificate(&retries).await?;
        let bundle = format!("{chain_pem}\n{key_pem}");
        let certificate = Certificate::parse(&certificate_name(domain), bundle.as_bytes())?;
        self.proxy
            .put_cert(certificate)
            .await
            .map_err(|error| AcmeError::Store(error.to_string()))
    }

    /// Takes the lease on `domain` for this proxy (check-and-set), unless another proxy holds
    /// it and it has not expired.
    async fn take_lease(&self, domain: &str) -> Result<LeaseState, AcmeError> {
        let key = self.lease_key(domain);
        let read = self.registry.kv_get(&key).await?;
        let now = now_unix();
        let index = match read.value {
            Some(entry) => {
                let held: Option<Lease> = serde_json::from_slice(&entry.value).ok();
                if let Some(lease) = held {
                    if lease.holder != self.holder && lease.until > now {
                        return Ok(LeaseState::HeldElsewhere {
                            outcome: lease.outcome,
                        });
                    }
                }
                entry.modify_index
            }
            None => 0,
        };
        let lease = Lease {
            holder: self.holder.clone(),
            until: now + i64::try_from(LEASE.as_secs()).unwrap_or(600),
            outcome: None,
        };
        let value = serde_json::to_vec(&lease).unwrap_or_default();
        if self.registry.kv_put_cas(&key, value, index).await? {
            Ok(LeaseState::Taken)
        } else {
            Ok(LeaseState::HeldElsewhere { outcome: None })
        }
    }

    /// Keeps this proxy's lease on `domain` until `until`, with the outcome the other proxies
    /// show (nothing when another proxy took it meanwhile).
    async fn hold_lease(&self, domain: &str, until: i64, outcome: &str) {
        let key = self.lease_key(domain);
        let Ok(read) = self.registry.kv_get(&key).await else {
            return;
        };
        let Some(entry) = read.value else {
            return;
        };
        let ours = serde_json::from_slice::<Lease>(&entry.value)
            .is_ok_and(|lease| lease.holder == self.holder);
        if !ours {
            return;
        }
        let lease = Lease {
            holder: self.holder.clone(),
            until,
            outcome: Some(outcome.to_string()),
        };
        let value = serde_json::to_vec(&lease).unwrap_or_default();
        if let Err(error) = self
            .registry
            .kv_put_cas(&key, value, entry.modify_index)
            .await
        {
            tracing::warn!(domain, %error, "keeping the ACME lease failed");
        }
    }

    fn lease_key(&self, domain: &str) -> String {
        format!("{}/acme/leases/{domain}", self.kv_prefix)
    }

    async fn delete_key(&self, key: &str) {
        if let Ok(read) = self.registry.kv_get(key).await {
            if let Some(entry) = read.value {
                if let Err(error) = self.registry.kv_delete_cas(key, entry.modify_index).await {
                    tracing::warn!(key, %error, "deleting an ACME key failed");
                }
            }
        }
    }

    /// The fleet's ACME account: the key stored at `<kv-prefix>/acme/account`, or a new one
    /// stored there with `cas=0` (when two proxies race, both end with the key that was stored).
    async fn account(&self) -> Result<Account, AcmeError> {
        let key = format!("{}/acme/account", self.kv_prefix);
        for _ in 0..3 {
            if let Some(entry) = self.registry.kv_get(&key).await?.value {
                let stored: StoredAccount =
                    serde_json::from_slice(&entry.value).map_err(|error| {
                        AcmeError::StoredAccount {
                            key: key.clone(),
                            message: error.to_string(),
                        }
                    })?;
                let der = BASE64
                    .decode(stored.key_pkcs8.as_bytes())
                    .map_err(|error| AcmeError::StoredAccount {
                        key: key.clone(),
                        message: error.to_string(),
                    })?;
                return self.register(der, false).await;
            }
            let (_, generated) = Key::generate_pkcs8()?;
            let der = generated.secret_pkcs8_der().to_vec();
            let stored = StoredAccount {
                key_pkcs8: BASE64.encode(&der),
            };
            let value = serde_json::to_vec(&stored).unwrap_or_default();
            if self.registry.kv_put_cas(&key, value, 0).await? {
                tracing::info!(key, "ACME account key created and stored");
                return self.register(der, true).await;
            }
        }
        Err(AcmeError::StoredAccount {
            key,
            message: "it keeps changing while being read".into(),
        })
    }

    /// The account of `der` at the directory (created there when new to it).
    async fn register(&self, der: Vec<u8>, created: bool) -> Result<Account, AcmeError> {
        let pkcs8 = PrivatePkcs8KeyDer::from(der);
        let key = Key::from_pkcs8_der(pkcs8.clone_key())?;
        let (account, _) = self
            .builder()?
            .create_from_key(
                (key, PrivateKeyDer::Pkcs8(pkcs8)),
                self.flags.directory_url().to_string(),
            )
            .await?;
        if created {
            if let Some(email) = &self.flags.acme_email {
                let contact = format!("mailto:{email}");
                account.update_contacts(&[contact.as_str()]).await?;
            }
        }
        Ok(account)
    }

    fn builder(&self) -> Result<AccountBuilder, AcmeError> {
        Ok(match &self.flags.acme_ca_file {
            Some(path) => Account::builder_with_root(path)?,
            None => Account::builder()?,
        })
    }
}

/// The account as stored in KV.
#[derive(Serialize, Deserialize)]
struct StoredAccount {
    /// PKCS#8 DER, base64.
    key_pkcs8: String,
}

/// What [`Orderer::take_lease`] found.
enum LeaseState {
    /// This proxy orders now.
    Taken,
    /// Another proxy orders (or waits to retry); its last outcome, if any.
    HeldElsewhere { outcome: Option<String> },
}

/// A lease on ordering one domain.
#[derive(Serialize, Deserialize)]
struct Lease {
    holder: String,
    /// Seconds since the epoch.
    until: i64,
    /// The holder's last outcome (`ok`, `error: …`), shown by the other proxies.
    #[serde(default)]
    outcome: Option<String>,
}

/// What `GET /certs` adds to a certificate: whether ACME manages it (its name is
/// `acme.<domain>`), and then when it is renewed and this proxy's last attempt and its outcome.
pub fn certificate_fields(
    info: &CertInfo,
    statuses: &[AcmeDomainStatus],
) -> Vec<(&'static str, serde_json::Value)> {
    let managed = info.name.starts_with(CERTIFICATE_PREFIX);
    let mut fields = vec![("ManagedByAcme", serde_json::Value::Bool(managed))];
    if managed {
        fields.push(("RenewAfter", rfc3339(renewal_time(info)).into()));
        if let Some(status) = statuses.iter().find(|status| status.cert_name == info.name) {
            fields.push(("LastAttempt", status.last_attempt.clone().into()));
            fields.push(("LastOutcome", status.last_outcome.clone().into()));
        }
    }
    fields
}

/// Whether `domain` needs a certificate: none served covers it, or the one that does has
/// expired, or it is flow-proxy's ACME certificate and past two thirds of its lifetime.
pub fn needs_certificate(certificates: &[CertInfo], domain: &str, now: i64) -> bool {
    let managed = certificate_name(domain);
    let covering: Vec<&CertInfo> = certificates
        .iter()
        .filter(|info| {
            info.name == managed || info.dns_names.iter().any(|name| covers(name, domain))
        })
        .collect();
    !covering.iter().any(|info| {
        if info.name == managed {
            now < renewal_time(info)
        } else {
            now < info.not_after_unix
        }
    })
}

/// Whether a certificate name (`shop.example.com`, or a wildcard `*.example.com`) covers
/// `domain`, as a TLS client checks it (a wildcard stands for exactly one label).
fn covers(name: &str, domain: &str) -> bool {
    match name.strip_prefix("*.") {
        Some(parent) => domain
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
        None => name == domain,
    }
}

/// Two thirds into the certificate's lifetime.
pub fn renewal_time(info: &CertInfo) -> i64 {
    let lifetime = (info.not_after_unix - info.not_before_unix).max(0);
    info.not_before_unix + lifetime * 2 / 3
}

/// `base` doubled for each failure after the first, at most [`MAX_BACKOFF`].
pub fn backoff(base: Duration, failures: u32) -> Duration {
    let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(20));
    base.saturating_mul(factor).min(MAX_BACKOFF)
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|at| {
            at.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, dns: &str, not_before: i64, not_after: i64) -> CertInfo {
        CertInfo {
            name: name.into(),
            dns_names: vec![dns.into()],
            not_after: String::new(),
            not_after_unix: not_after,
            not_before_unix: not_before,
            expired: false,
            fingerprint: String::new(),
        }
    }

    #[test]
    fn a_domain_is_ordered_without_a_valid_certificate_and_renewed_at_two_thirds() {
        assert!(needs_certificate(&[], "shop.example.com", 1000));
        let managed = [info("acme.shop.example.com", "shop.example.com", 0, 900)];
        assert!(!needs_certificate(&managed, "shop.example.com", 599));
        assert!(needs_certificate(&managed, "shop.example.com", 600));
        // Somebody else's certificate is used until it expires.
        let uploaded = [info("shop", "shop.example.com", 0, 900)];
        assert!(!needs_certificate(&uploaded, "shop.example.com", 899));
        assert!(needs_certificate(&uploaded, "shop.example.com", 900));
        assert!(needs_certificate(&uploaded, "other.example.com", 10));
        // A wildcard covers one label, not the parent nor deeper names.
        let wildcard = [info("wild", "*.example.com", 0, 900)];
        assert!(!needs_certificate(&wildcard, "shop.example.com", 10));
        assert!(needs_certificate(&wildcard, "example.com", 10));
        assert!(needs_certificate(&wildcard, "a.shop.example.com", 10));
    }

    #[test]
    fn failures_back_off_exponentially_up_to_a_bound() {
        let base = Duration::from_secs(60);
        assert_eq!(backoff(base, 1), base);
        assert_eq!(backoff(base, 2), base * 2);
        assert_eq!(backoff(base, 4), base * 8);
        assert_eq!(backoff(base, 40), MAX_BACKOFF);
    }
}
