//! The dashboard's sign-in: the token a person types is exchanged for a signed session cookie,
//! and every form carries a CSRF token bound to that session.
//!
//! Nothing is stored: a session is `v1.<expires>.<nonce>.<mac>`, the MAC (HMAC-SHA256) over the
//! rest under a key derived from the dashboard token, so every replica (and every Lambda) checks
//! it alone, and changing the token ends every session. A form's CSRF token is the MAC of the
//! session's nonce under the same key (the synchronizer-token pattern without server state); the
//! sign-in form, before any session, is bound the same way to a random pre-session cookie.

use std::time::Duration;

use axum::http::HeaderMap;
use axum::http::header;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use cookie::{Cookie, SameSite};
use hmac::{KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::config::Secret;

/// The session cookie.
pub const SESSION_COOKIE: &str = "kb_session";
/// The random value the sign-in form's CSRF token is bound to, before there is a session.
pub const PRE_SESSION_COOKIE: &str = "kb_pre";
/// A message for the next page shown (after a redirect), signed like the session.
pub const FLASH_COOKIE: &str = "kb_flash";
/// Every dashboard cookie is scoped to the dashboard's paths.
pub const COOKIE_PATH: &str = "/ui";

const VERSION: &str = "v1";
const NONCE_BYTES: usize = 16;

type HmacSha256 = hmac::Hmac<Sha256>;

/// Issues and checks sessions. Closed (no token configured) it signs nobody in.
#[derive(Clone)]
pub struct Sessions {
    token: Option<Secret>,
    key: Option<[u8; 32]>,
    lifetime: Duration,
}

/// A valid session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    nonce: String,
    pub expires: i64,
}

impl Sessions {
    /// Sessions for the dashboard token `token` (`None`: the dashboard is closed), lasting
    /// `lifetime`.
    pub fn new(token: Option<Secret>, lifetime: Duration) -> Sessions {
        let key = token.as_ref().map(|t| {
            let mut mac = <HmacSha256 as KeyInit>::new_from_slice(t.expose().as_bytes())
                .expect("HMAC takes any key length");
            mac.update(b"kitebridge dashboard sessions v1");
            mac.finalize().into_bytes().into()
        });
        Sessions {
            token,
            key,
            lifetime,
        }
    }

    /// Whether anyone can sign in at all.
    pub fn is_open(&self) -> bool {
        self.key.is_some()
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// Whether `presented` is the dashboard token (constant time).
    pub fn token_matches(&self, presented: &str) -> bool {
        self.token.as_ref().is_some_and(|t| t.matches(presented))
    }

    fn mac(&self, parts: &[&[u8]]) -> Option<[u8; 32]> {
        let key = self.key.as_ref()?;
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key).expect("any key length");
        for p in parts {
            // Length-prefixed, so no two different part lists sign the same bytes.
            mac.update(&(p.len() as u64).to_be_bytes());
            mac.update(p);
        }
        Some(mac.finalize().into_bytes().into())
    }

    /// A new session from now, and its cookie's value.
    pub fn issue(&self, now: i64) -> Option<(Session, String)> {
        let nonce = random_token();
        let expires = now.saturating_add(self.lifetime.as_secs() as i64);
        let expires_s = expires.to_string();
        let mac = self.mac(&[VERSION.as_bytes(), expires_s.as_bytes(), nonce.as_bytes()])?;
        let value = format!("{VERSION}.{expires_s}.{nonce}.{}", B64.encode(mac));
        Some((Session { nonce, expires }, value))
    }

    /// The session a cookie value stands for, if it is ours, intact and not expired at `now`.
    pub fn verify(&self, value: &str, now: i64) -> Option<Session> {
        let mut parts = value.split('.');
        let (v, expires_s, nonce, mac) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || v != VERSION {
            return None;
        }
        let presented = B64.decode(mac).ok()?;
        let expected = self.mac(&[v.as_bytes(), expires_s.as_bytes(), nonce.as_bytes()])?;
        if !bool::from(presented.as_slice().ct_eq(expected.as_slice())) {
            return None;
        }
        let expires: i64 = expires_s.parse().ok()?;
        (now < expires).then(|| Session {
            nonce: nonce.to_string(),
            expires,
        })
    }

    /// The CSRF token of a session's forms.
    pub fn csrf(&self, session: &Session) -> String {
        self.csrf_for("session", &session.nonce)
    }

    /// The CSRF token of the sign-in form, bound to the pre-session cookie's value.
    pub fn pre_session_csrf(&self, pre: &str) -> String {
        self.csrf_for("pre-session", pre)
    }

    fn csrf_for(&self, kind: &str, nonce: &str) -> String {
        match self.mac(&[b"csrf", kind.as_bytes(), nonce.as_bytes()]) {
            Some(mac) => B64.encode(mac),
            // Closed: no form is accepted, and this matches nothing a form could carry.
            None => String::new(),
        }
    }

    /// Whether `presented` is the expected CSRF token (constant time; an empty one never is).
    pub fn csrf_matches(expected: &str, presented: &str) -> bool {
        !expected.is_empty() && bool::from(expected.as_bytes().ct_eq(presented.as_bytes()))
    }

    /// A flash message's cookie value: `kind`, the message, and a MAC over both.
    pub fn flash_value(&self, kind: FlashKind, message: &str) -> Option<String> {
        let kind = kind.as_str();
        let mac = self.mac(&[b"flash", kind.as_bytes(), message.as_bytes()])?;
        Some(format!(
            "{kind}.{}.{}",
            B64.encode(message.as_bytes()),
            B64.encode(mac)
        ))
    }

    /// The flash message a cookie value holds, if it is ours.
    pub fn read_flash(&self, value: &str) -> Option<(FlashKind, String)> {
        let mut parts = value.split('.');
        let (kind, message, mac) = (parts.next()?, parts.next()?, parts.next()?);
        let message = String::from_utf8(B64.decode(message).ok()?).ok()?;
        let expected = self.mac(&[b"flash", kind.as_bytes(), message.as_bytes()])?;
        let presented = B64.decode(mac).ok()?;
        if !bool::from(presented.as_slice().ct_eq(expected.as_slice())) {
            return None;
        }
        Some((FlashKind::parse(kind)?, message))
    }
}

/// A message shown once, on the page a form redirects to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlashKind {
    Notice,
    Error,
}

impl FlashKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FlashKind::Notice => "notice",
            FlashKind::Error => "error",
        }
    }

    fn parse(s: &str) -> Option<FlashKind> {
        match s {
            "notice" => Some(FlashKind::Notice),
            "error" => Some(FlashKind::Error),
            _ => None,
        }
    }
}

/// 16 random bytes from the operating system, URL-safe.
pub fn random_token() -> String {
    let mut bytes = [0u8; NONCE_BYTES];
    getrandom::fill(&mut bytes).expect("the operating system's random source");
    B64.encode(bytes)
}

/// The value of the cookie `name` in a request's `Cookie` headers.
pub fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == name)
        .map(|c| c.value().to_string())
}

/// Whether the request came to a loopback name, where a cookie may go without `Secure` (a
/// browser does not send `Secure` cookies over plain http, and loopback needs no TLS).
pub fn is_loopback(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A `Set-Cookie` value for a dashboard cookie: HttpOnly, SameSite=Strict, on the dashboard's
/// paths, `Secure` unless on loopback; `max_age` `None` removes it.
pub fn set_cookie(name: &str, value: &str, max_age: Option<Duration>, secure: bool) -> String {
    let age = max_age.map_or(cookie::time::Duration::ZERO, |d| {
        cookie::time::Duration::seconds(d.as_secs() as i64)
    });
    Cookie::build((name, value))
        .path(COOKIE_PATH)
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(secure)
        .max_age(age)
        .build()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions() -> Sessions {
        Sessions::new(Some(Secret::new("tok")), Duration::from_secs(3600))
    }

    #[test]
    fn a_session_is_valid_until_it_expires_and_only_intact() {
        let s = sessions();
        let (session, value) = s.issue(1_000).unwrap();
        assert_eq!(s.verify(&value, 1_000), Some(session.clone()));
        assert_eq!(s.verify(&value, 4_599), Some(session));
        assert_eq!(s.verify(&value, 4_600), None, "expired");
        // Any change to the payload or the MAC is refused.
        let longer = value.replacen(".4600.", ".9999999999.", 1);
        assert_eq!(s.verify(&longer, 1_000), None);
        let mut forged = value.clone();
        let last = forged.pop().unwrap();
        forged.push(if last == 'A' { 'B' } else { 'A' });
        assert_eq!(s.verify(&forged, 1_000), None);
        assert_eq!(s.verify("v1.9999999999.x.", 1_000), None);
        assert_eq!(s.verify("", 1_000), None);
        // Another token's sessions are not ours.
        let other = Sessions::new(Some(Secret::new("other")), Duration::from_secs(3600));
        assert_eq!(other.verify(&value, 1_000), None);
    }

    #[test]
    fn csrf_tokens_are_bound_to_their_session() {
        let s = sessions();
        let (a, _) = s.issue(0).unwrap();
        let (b, _) = s.issue(0).unwrap();
        assert!(Sessions::csrf_matches(&s.csrf(&a), &s.csrf(&a)));
        assert!(!Sessions::csrf_matches(&s.csrf(&a), &s.csrf(&b)));
        assert!(!Sessions::csrf_matches(&s.csrf(&a), ""));
        assert_ne!(s.csrf(&a), s.pre_session_csrf(&a.nonce));
    }

    #[test]
    fn a_closed_dashboard_signs_nobody_in() {
        let s = Sessions::new(None, Duration::from_secs(60));
        assert!(!s.is_open());
        assert!(s.issue(0).is_none());
        assert!(!s.token_matches(""));
        assert!(!Sessions::csrf_matches(&s.pre_session_csrf("x"), ""));
    }

    #[test]
    fn flash_messages_round_trip_and_cannot_be_forged() {
        let s = sessions();
        let v = s
            .flash_value(FlashKind::Error, "no, and <b>why</b>")
            .unwrap();
        assert_eq!(
            s.read_flash(&v),
            Some((FlashKind::Error, "no, and <b>why</b>".to_string()))
        );
        let forged = v.replacen("error", "notice", 1);
        assert_eq!(s.read_flash(&forged), None);
    }

    #[test]
    fn cookies_are_strict_http_only_and_secure_off_loopback() {
        let c = set_cookie(SESSION_COOKIE, "v", Some(Duration::from_secs(60)), true);
        for part in [
            "kb_session=v",
            "HttpOnly",
            "SameSite=Strict",
            "Secure",
            "Path=/ui",
            "Max-Age=60",
        ] {
            assert!(c.contains(part), "{c} lacks {part}");
        }
        assert!(!set_cookie(SESSION_COOKIE, "v", None, false).contains("Secure"));
        let host = |h: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::HOST, h.parse().unwrap());
            is_loopback(&m)
        };
        assert!(host("127.0.0.1:8080"));
        assert!(host("localhost:3000"));
        assert!(host("[::1]:80"));
        assert!(!host("kitebridge.example.com"));
        assert!(!host("10.0.0.1:80"));
        assert!(!host("127.0.0.1.example.com"));
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, "a=1; kb_session=xyz".parse().unwrap());
        assert_eq!(cookie_value(&h, SESSION_COOKIE).as_deref(), Some("xyz"));
        assert_eq!(cookie_value(&h, FLASH_COOKIE), None);
    }
}
