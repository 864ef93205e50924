//! Session timers (RFC 4028) on one dialog: what the Session-Expires and Min-SE headers
//! say, how each side's interval and refresher are chosen, and when a refresh is due or
//! the session has expired. Sans-IO: the call feeds it requests and responses and asks it
//! for its next instant.
//!
//! Owns: the negotiation of one dialog's interval and refresher (RFC 4028 7-9) and its
//! clock. Must not touch: sending the refresh (UPDATE or re-INVITE, the call's) or ending
//! the call.

use std::time::Duration;

use tokio::time::Instant;

use crate::sip::Headers;

/// The least Session-Expires any UA may ask for (RFC 4028 4: 90 seconds).
pub const MIN_SE_FLOOR: u32 = 90;

/// Who refreshes the session: the dialog's UAC or its UAS (RFC 4028 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresher {
    Uac,
    Uas,
}

impl Refresher {
    pub fn as_str(self) -> &'static str {
        match self {
            Refresher::Uac => "uac",
            Refresher::Uas => "uas",
        }
    }
}

/// A Session-Expires value (`x` in compact form): `delta-seconds [;refresher=uac|uas]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionExpires {
    pub delta: u32,
    pub refresher: Option<Refresher>,
}

impl SessionExpires {
    /// The header of `headers`, if any and well-formed.
    pub fn of(headers: &Headers) -> Option<Result<SessionExpires, ()>> {
        let v = headers
            .get("Session-Expires")
            .or_else(|| headers.get("x"))?;
        Some(SessionExpires::parse(v).ok_or(()))
    }

    pub fn parse(v: &str) -> Option<SessionExpires> {
        let mut parts = v.split(';');
        let delta = parts.next()?.trim().parse::<u32>().ok()?;
        let mut refresher = None;
        for p in parts {
            let (name, value) = p.split_once('=').unwrap_or((p, ""));
            if name.trim().eq_ignore_ascii_case("refresher") {
                refresher = match value.trim().to_ascii_lowercase().as_str() {
                    "uac" => Some(Refresher::Uac),
                    "uas" => Some(Refresher::Uas),
                    _ => return None,
                };
            }
        }
        Some(SessionExpires { delta, refresher })
    }

    pub fn value(&self) -> String {
        match self.refresher {
            Some(r) => format!("{};refresher={}", self.delta, r.as_str()),
            None => self.delta.to_string(),
        }
    }
}

/// The Min-SE of `headers` (RFC 4028 5), if any.
pub fn min_se_of(headers: &Headers) -> Option<u32> {
    headers
        .get("Min-SE")?
        .split(';')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Whether `headers` list the `timer` option in Supported (or `k`) or Require.
pub fn supports_timer(headers: &Headers) -> bool {
    ["Supported", "k", "Require"].iter().any(|h| {
        headers
            .get_all(h)
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("timer"))
    })
}

/// The server's settings (`call.session_expires_s`, `call.min_se_s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionTimerConfig {
    /// The interval asked for on the legs we start (0: session timers off).
    pub session_expires: u32,
    /// The least interval accepted (422 below it).
    pub min_se: u32,
}

/// What the UAS of a dialog does with an INVITE (or refresh) that may ask for a timer
/// (RFC 4028 9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UasDecision {
    /// 422 Session Interval Too Small with this Min-SE.
    TooBrief { min_se: u32 },
    /// The 2xx carries this Session-Expires (with `Require: timer` when the UAC
    /// supports it).
    Timer {
        expires: SessionExpires,
        require: bool,
    },
    /// No session timer on this dialog.
    Off,
}

/// RFC 4028 9 for a request received: below our Min-SE is 422; an interval asked for is
/// kept (made smaller down to our `session_expires`, never below the request's Min-SE);
/// the refresher asked for is kept, else the UAC when it supports timers (it then
/// refreshes), else us. A request that asks for nothing gets no timer ("accept" mode, like
/// Asterisk's default): a timer we imposed on a UA without UPDATE would cost a re-INVITE we
/// must build from the SDP.
pub fn uas_decide(cfg: SessionTimerConfig, headers: &Headers) -> UasDecision {
    if cfg.session_expires == 0 {
        return UasDecision::Off;
    }
    let asked = match SessionExpires::of(headers) {
        None | Some(Err(())) => return UasDecision::Off,
        Some(Ok(se)) => se,
    };
    if asked.delta < cfg.min_se {
        return UasDecision::TooBrief { min_se: cfg.min_se };
    }
    let floor = min_se_of(headers).unwrap_or(MIN_SE_FLOOR).max(cfg.min_se);
    let delta = asked.delta.min(cfg.session_expires.max(floor));
    let supports = supports_timer(headers);
    let refresher = asked.refresher.unwrap_or(if supports {
        Refresher::Uac
    } else {
        Refresher::Uas
    });
    UasDecision::Timer {
        expires: SessionExpires {
            delta,
            refresher: Some(refresher),
        },
        require: supports,
    }
}

/// The Session-Expires and Min-SE headers of an INVITE we send (RFC 4028 7.1). The UAS is
/// asked to refresh: it is the party that knows its own media state; we refresh only when
/// it insists.
pub fn uac_offer(cfg: SessionTimerConfig, interval: u32) -> [(&'static str, String); 3] {
    [
        ("Supported", "timer".into()),
        (
            "Session-Expires",
            SessionExpires {
                delta: interval,
                refresher: Some(Refresher::Uas),
            }
            .value(),
        ),
        ("Min-SE", cfg.min_se.max(MIN_SE_FLOOR).to_string()),
    ]
}

/// One dialog's running session timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionTimer {
    /// The negotiated interval, seconds.
    pub delta: u32,
    /// We send the refreshes (else we expect them).
    pub we_refresh: bool,
    /// When the next refresh is due (ours) or the session ends unrefreshed (theirs).
    pub due: Instant,
}

impl SessionTimer {
    /// A timer whose session was refreshed `now`.
    pub fn new(delta: u32, we_refresh: bool, now: Instant) -> SessionTimer {
        let mut t = SessionTimer {
            delta,
            we_refresh,
            due: now,
        };
        t.refreshed(now);
        t
    }

    /// From the Session-Expires of a 2xx: we are this dialog's UAC (`we_are_uac`) or UAS.
    pub fn from_expires(se: SessionExpires, we_are_uac: bool, now: Instant) -> SessionTimer {
        let refresher = se.refresher.unwrap_or(Refresher::Uac);
        let we_refresh = (refresher == Refresher::Uac) == we_are_uac;
        SessionTimer::new(se.delta, we_refresh, now)
    }

    /// A refresh succeeded (a 2xx to a re-INVITE or UPDATE, either way): RFC 4028 10.
    pub fn refreshed(&mut self, now: Instant) {
        let delta = u64::from(self.delta);
        self.due = if self.we_refresh {
            // The refresher sends at half the interval.
            now + Duration::from_secs(delta / 2)
        } else {
            // The other side gives up at delta - min(32, delta/3) without a refresh, and
            // sends BYE then (RFC 4028 10).
            now + Duration::from_secs(delta - (delta / 3).min(32))
        };
    }

    /// The Session-Expires value for this dialog's messages (`we_are_uac`: the refresher
    /// named from the UAC's side).
    pub fn expires(&self, we_are_uac: bool) -> SessionExpires {
        let refresher = if self.we_refresh == we_are_uac {
            Refresher::Uac
        } else {
            Refresher::Uas
        };
        SessionExpires {
            delta: self.delta,
            refresher: Some(refresher),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(list: &[(&str, &str)]) -> Headers {
        let mut h = Headers::new();
        for (n, v) in list {
            h.push(n, *v);
        }
        h
    }

    const CFG: SessionTimerConfig = SessionTimerConfig {
        session_expires: 1800,
        min_se: 90,
    };

    #[test]
    fn parses_session_expires_and_min_se() {
        assert_eq!(
            SessionExpires::parse("1800;refresher=UAS"),
            Some(SessionExpires {
                delta: 1800,
                refresher: Some(Refresher::Uas)
            })
        );
        assert_eq!(SessionExpires::parse(" 90 ").unwrap().refresher, None);
        assert!(SessionExpires::parse("abc").is_none());
        assert!(SessionExpires::parse("90;refresher=both").is_none());
        let h = headers(&[("x", "600;refresher=uac"), ("Min-SE", "120")]);
        assert_eq!(SessionExpires::of(&h).unwrap().unwrap().delta, 600);
        assert_eq!(min_se_of(&h), Some(120));
        assert!(supports_timer(&headers(&[("Supported", "100rel, Timer")])));
        assert!(!supports_timer(&headers(&[("Supported", "100rel")])));
    }

    #[test]
    fn the_uas_refuses_too_brief_keeps_the_asked_refresher_and_accepts_only_when_asked() {
        let brief = headers(&[("Session-Expires", "60")]);
        assert_eq!(
            uas_decide(CFG, &brief),
            UasDecision::TooBrief { min_se: 90 }
        );
        let asked = headers(&[
            ("Session-Expires", "600;refresher=uas"),
            ("Supported", "timer"),
        ]);
        assert_eq!(
            uas_decide(CFG, &asked),
            UasDecision::Timer {
                expires: SessionExpires {
                    delta: 600,
                    refresher: Some(Refresher::Uas)
                },
                require: true
            }
        );
        // No refresher named: the UAC refreshes when it supports timers, else we do.
        let uac = headers(&[("Session-Expires", "4000"), ("Supported", "timer")]);
        assert!(matches!(
            uas_decide(CFG, &uac),
            UasDecision::Timer {
                expires: SessionExpires {
                    delta: 1800,
                    refresher: Some(Refresher::Uac)
                },
                require: true
            }
        ));
        let old = headers(&[("Session-Expires", "300")]);
        assert!(matches!(
            uas_decide(CFG, &old),
            UasDecision::Timer {
                expires: SessionExpires {
                    refresher: Some(Refresher::Uas),
                    ..
                },
                require: false
            }
        ));
        assert_eq!(uas_decide(CFG, &headers(&[])), UasDecision::Off);
        let off = SessionTimerConfig {
            session_expires: 0,
            ..CFG
        };
        assert_eq!(uas_decide(off, &asked), UasDecision::Off);
    }

    #[tokio::test(start_paused = true)]
    async fn refreshes_at_half_and_expires_before_the_interval() {
        let now = Instant::now();
        let ours = SessionTimer::new(600, true, now);
        assert_eq!(ours.due - now, Duration::from_secs(300));
        let theirs = SessionTimer::new(600, false, now);
        assert_eq!(theirs.due - now, Duration::from_secs(568));
        let short = SessionTimer::new(90, false, now);
        assert_eq!(short.due - now, Duration::from_secs(60));
        let se = SessionExpires::parse("1200;refresher=uac").unwrap();
        assert!(SessionTimer::from_expires(se, true, now).we_refresh);
        assert!(!SessionTimer::from_expires(se, false, now).we_refresh);
        assert_eq!(ours.expires(false).value(), "600;refresher=uas");
        assert_eq!(ours.expires(true).value(), "600;refresher=uac");
    }
}
