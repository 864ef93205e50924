//! The registrar's figures, from its own counters ([`super::RegistrarStats`]).
//!
//! Metrics: `strowger_registrar_bindings` (gauge), `strowger_registrar_events_total{event=
//! "registered"|"refreshed"|"removed"|"expired"|"store_error"}`.

use super::Registrar;
use crate::metrics::{self, load, Label, Telemetry};

/// What happened to a binding.
#[derive(Clone, Copy, Debug)]
pub enum BindingEvent {
    Registered,
    Refreshed,
    Removed,
    Expired,
    StoreError,
    /// A REGISTER refused because it would take its address of record past
    /// `registrar.max_contacts`.
    TooManyContacts,
}
crate::label!(
    BindingEvent,
    "event",
    Registered = "registered",
    Refreshed = "refreshed",
    Removed = "removed",
    Expired = "expired",
    StoreError = "store_error",
    TooManyContacts = "too_many_contacts",
);

impl Registrar {
    /// Registers the registrar's families on `telemetry`, filled at each scrape.
    pub fn register_metrics(&self, telemetry: &Telemetry) -> Result<(), metrics::Error> {
        let bindings = telemetry.gauge("strowger_registrar_bindings", "Live registrar bindings")?;
        let events = telemetry.counters::<BindingEvent>(
            "strowger_registrar_events_total",
            "Registrar binding events",
        )?;
        let registrar = self.clone();
        telemetry.on_scrape(move || {
            bindings.set(registrar.count() as i64);
            let s = registrar.stats();
            for e in BindingEvent::ALL {
                let n = match e {
                    BindingEvent::Registered => &s.registered,
                    BindingEvent::Refreshed => &s.refreshed,
                    BindingEvent::Removed => &s.removed,
                    BindingEvent::Expired => &s.expired,
                    BindingEvent::StoreError => &s.store_errors,
                    BindingEvent::TooManyContacts => &s.too_many_contacts,
                };
                events.catch_up(*e, load(n));
            }
        });
        Ok(())
    }
}
