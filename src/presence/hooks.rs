//! Presence's port to the dial plan above it: the hooks a MESSAGE or SUBSCRIBE outside a
//! dialog runs (`on_message`, `on_subscribe`) and what crosses. The script engine
//! implements [`PresenceHooks`] and imports this module, never the reverse; `server`
//! hands the engine to [`super::PresenceParts`]. A reload changes what the engine runs,
//! not the handle presence holds.

use std::future::Future;
use std::pin::Pin;

/// The hooks presence runs.
pub trait PresenceHooks: Send + Sync + 'static {
    /// Whether the current script defines `on_message`.
    fn has_on_message(&self) -> bool;

    /// Whether the current script defines `on_subscribe`.
    fn has_on_subscribe(&self) -> bool;

    /// Runs `on_message(req)`.
    fn on_message<'a>(
        &'a self,
        info: &'a MessageInfo,
    ) -> Pin<Box<dyn Future<Output = MessageVerdict> + Send + 'a>>;

    /// Runs `on_subscribe(req)`.
    fn on_subscribe<'a>(
        &'a self,
        info: &'a SubscribeInfo,
    ) -> Pin<Box<dyn Future<Output = SubscribeVerdict> + Send + 'a>>;
}

/// What `on_message(req)` sees of a MESSAGE.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MessageInfo {
    pub from: String,
    pub to: String,
    pub ruri: String,
    pub user: Option<String>,
    pub source: String,
    pub content_type: Option<String>,
    pub body: String,
    /// Headers (lower-case name, value) in order; `req:header` gives the first.
    pub headers: Vec<(String, String)>,
}

/// What `on_message` decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageVerdict {
    /// No hook, or no verdict: to the recipient's registered contacts.
    Default,
    Reject(u16, String),
    /// `req:route(targets)`: to these URIs (all at once; the first 2xx wins).
    Route(Vec<String>),
    /// The hook failed: answer 500. Text with file:line.
    Failed(String),
}

/// What `on_subscribe(req)` sees of a SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubscribeInfo {
    pub package: String,
    pub resource: String,
    pub subscriber: String,
    pub user: Option<String>,
    pub source: String,
    pub expires: Option<u32>,
    pub headers: Vec<(String, String)>,
}

/// What `on_subscribe` decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscribeVerdict {
    /// No hook, or no verdict: the subscription is accepted.
    Default,
    Reject(u16, String),
    /// `req:route(uri)`: the subscription is served by that server (e.g. a voicemail
    /// server's message-summary); the server relays it as a B2BUA.
    Route(String),
    Failed(String),
}
