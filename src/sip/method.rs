//! SIP request methods: the 14 of the seed digest plus any extension token.

use std::fmt;

/// A SIP method. Unknown methods are kept (RFC 3261 8.2.1 answers them with 501),
/// which is one of the gaps of rsip's closed `Method` enum.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Method {
    Invite,
    Ack,
    Bye,
    Cancel,
    Options,
    Register,
    Prack,
    Subscribe,
    Notify,
    Info,
    Update,
    Refer,
    Publish,
    Message,
    /// An extension method (a valid token we do not implement).
    Other(Box<str>),
}

impl Method {
    /// Every method the server implements, in the order of the Allow header.
    pub const ALL: [Method; 14] = [
        Method::Invite,
        Method::Ack,
        Method::Bye,
        Method::Cancel,
        Method::Options,
        Method::Register,
        Method::Prack,
        Method::Subscribe,
        Method::Notify,
        Method::Info,
        Method::Update,
        Method::Refer,
        Method::Publish,
        Method::Message,
    ];

    /// Methods are case-sensitive (RFC 3261 7.1).
    pub fn from_token(s: &str) -> Method {
        match s {
            "INVITE" => Method::Invite,
            "ACK" => Method::Ack,
            "BYE" => Method::Bye,
            "CANCEL" => Method::Cancel,
            "OPTIONS" => Method::Options,
            "REGISTER" => Method::Register,
            "PRACK" => Method::Prack,
            "SUBSCRIBE" => Method::Subscribe,
            "NOTIFY" => Method::Notify,
            "INFO" => Method::Info,
            "UPDATE" => Method::Update,
            "REFER" => Method::Refer,
            "PUBLISH" => Method::Publish,
            "MESSAGE" => Method::Message,
            other => Method::Other(other.into()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Method::Invite => "INVITE",
            Method::Ack => "ACK",
            Method::Bye => "BYE",
            Method::Cancel => "CANCEL",
            Method::Options => "OPTIONS",
            Method::Register => "REGISTER",
            Method::Prack => "PRACK",
            Method::Subscribe => "SUBSCRIBE",
            Method::Notify => "NOTIFY",
            Method::Info => "INFO",
            Method::Update => "UPDATE",
            Method::Refer => "REFER",
            Method::Publish => "PUBLISH",
            Method::Message => "MESSAGE",
            Method::Other(s) => s,
        }
    }

    pub fn is_known(&self) -> bool {
        !matches!(self, Method::Other(_))
    }

    /// The comma-separated list for Allow headers, joined once (it went into every
    /// INVITE and 200 of a call, built anew each time: a Vec and a String).
    pub fn allow_list() -> &'static str {
        static LIST: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            Method::ALL
                .iter()
                .map(Method::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        });
        &LIST
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
