// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Precopy notifications: how the migration thread tells the balloon (and anything else that
//! cares) where a precopy migration stands.
//!
//! The events and their order follow QEMU's `PrecopyNotifyReason`: every bitmap sync is
//! wrapped in [`BeforeBitmapSync`](PrecopyEvent::BeforeBitmapSync) and
//! [`AfterBitmapSync`](PrecopyEvent::AfterBitmapSync); [`Setup`](PrecopyEvent::Setup) comes
//! after the first sync, [`Complete`](PrecopyEvent::Complete) at switchover, and
//! [`Cleanup`](PrecopyEvent::Cleanup) at the end whatever the outcome (success, failure or
//! cancel).

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What the precopy migration is doing now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum PrecopyEvent {
    /// The migration is set up (dirty logging already runs and the first sync is done).
    Setup,
    /// A bitmap sync is about to happen: whatever clears the bitmap must stop now.
    BeforeBitmapSync,
    /// A bitmap sync has happened: the bitmap holds every page dirtied until now.
    AfterBitmapSync,
    /// Switchover starts: the VM is being stopped for the final stage.
    Complete,
    /// The migration is over (completed, failed or cancelled).
    Cleanup,
}

impl fmt::Display for PrecopyEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            PrecopyEvent::Setup => "setup",
            PrecopyEvent::BeforeBitmapSync => "before-bitmap-sync",
            PrecopyEvent::AfterBitmapSync => "after-bitmap-sync",
            PrecopyEvent::Complete => "complete",
            PrecopyEvent::Cleanup => "cleanup",
        };
        f.write_str(name)
    }
}

/// What a notifier may learn about the migration, and the one thing it may change.
#[derive(Debug)]
pub struct PrecopyContext<'a> {
    vm_running: bool,
    postcopy: bool,
    bulk_stage: &'a AtomicBool,
}

impl PrecopyContext<'_> {
    /// Whether the guest's vCPUs run. An [`AfterBitmapSync`](PrecopyEvent::AfterBitmapSync)
    /// with the VM stopped is the final sync before the device state is saved.
    pub fn vm_running(&self) -> bool {
        self.vm_running
    }

    /// Whether postcopy is enabled for this migration. Free page hinting must stay off then:
    /// a page the source skipped could later be requested by the destination.
    pub fn postcopy_enabled(&self) -> bool {
        self.postcopy
    }

    /// Switches the migration's bulk stage off (QEMU's `precopy_disable_bulk_stage`): the
    /// first pass must consult the bitmap instead of sending every page, or the pages that
    /// hints cleared would be sent anyway.
    pub fn disable_bulk_stage(&self) {
        self.bulk_stage.store(false, Ordering::Release);
    }

    /// Whether the bulk stage is still enabled.
    pub fn bulk_stage_enabled(&self) -> bool {
        self.bulk_stage.load(Ordering::Acquire)
    }
}

/// Error a notifier returns; any error type, boxed.
pub type NotifierError = Box<dyn std::error::Error + Send + Sync>;

/// Something that wants to hear about precopy events, such as the balloon device.
///
/// Notifiers are called on the migration thread, in the order they were added, and must not
/// block for long.
pub trait PrecopyNotifier: Send + Sync {
    /// A name for error messages and logs.
    fn name(&self) -> &str;

    /// Handles `event`.
    ///
    /// # Errors
    ///
    /// Any failure; the chain reports it with this notifier's name.
    fn notify(&self, event: PrecopyEvent, ctx: &PrecopyContext<'_>) -> Result<(), NotifierError>;
}

/// Handle of a notifier in a [`PrecopyNotifierChain`], for removing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NotifierId(u64);

/// One notifier that failed.
#[derive(Debug)]
pub struct NotifierFailure {
    /// Which notifier.
    pub id: NotifierId,
    /// Its [`name`](PrecopyNotifier::name).
    pub name: String,
    /// What it returned.
    pub source: NotifierError,
}

/// The notifiers that failed one [`PrecopyNotifierChain::notify`] call.
///
/// For every event but [`Cleanup`](PrecopyEvent::Cleanup) the chain stops at the first
/// failure, so there is exactly one; on `Cleanup` every notifier runs and each failure is
/// listed, in order.
#[derive(Debug)]
pub struct NotifyError {
    /// The event being delivered.
    pub event: PrecopyEvent,
    /// The failures, in notification order; never empty.
    pub failures: Vec<NotifierFailure>,
}

impl fmt::Display for NotifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "precopy {} notification failed:", self.event)?;
        for failure in &self.failures {
            write!(f, " notifier '{}': {};", failure.name, failure.source)?;
        }
        Ok(())
    }
}

impl std::error::Error for NotifyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.failures
            .first()
            .map(|f| f.source.as_ref() as &(dyn std::error::Error + 'static))
    }
}

/// The state of the migration that every notification carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MigrationState {
    /// Whether the guest's vCPUs run.
    pub vm_running: bool,
    /// Whether postcopy is enabled.
    pub postcopy: bool,
}

/// An ordered list of [`PrecopyNotifier`]s, owned by the migration thread.
///
/// It also holds the migration's bulk-stage flag, which starts enabled each time the chain
/// is [reset](Self::reset_bulk_stage) and which any notifier may switch off.
///
/// # Example
///
/// ```
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use std::sync::Arc;
/// use virtio_balloon::migration::{
///     MigrationState, NotifierError, PrecopyContext, PrecopyEvent, PrecopyNotifier,
///     PrecopyNotifierChain,
/// };
///
/// struct CountSyncs(AtomicUsize);
/// impl PrecopyNotifier for CountSyncs {
///     fn name(&self) -> &str {
///         "count-syncs"
///     }
///     fn notify(&self, event: PrecopyEvent, ctx: &PrecopyContext<'_>) -> Result<(), NotifierError> {
///         if event == PrecopyEvent::AfterBitmapSync {
///             self.0.fetch_add(1, Ordering::Relaxed);
///             ctx.disable_bulk_stage();
///         }
///         Ok(())
///     }
/// }
///
/// let counter = Arc::new(CountSyncs(AtomicUsize::new(0)));
/// let mut chain = PrecopyNotifierChain::new();
/// let id = chain.add(counter.clone());
/// let running = MigrationState { vm_running: true, postcopy: false };
/// chain.notify(PrecopyEvent::AfterBitmapSync, running).unwrap();
/// assert_eq!(counter.0.load(Ordering::Relaxed), 1);
/// assert!(!chain.bulk_stage_enabled());
/// assert!(chain.remove(id));
/// ```
pub struct PrecopyNotifierChain {
    notifiers: Vec<(NotifierId, Arc<dyn PrecopyNotifier>)>,
    next_id: u64,
    bulk_stage: AtomicBool,
}

impl fmt::Debug for PrecopyNotifierChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.notifiers.iter().map(|(_, n)| n.name()).collect();
        f.debug_struct("PrecopyNotifierChain")
            .field("notifiers", &names)
            .field("bulk_stage", &self.bulk_stage_enabled())
            .finish()
    }
}

impl Default for PrecopyNotifierChain {
    fn default() -> Self {
        Self::new()
    }
}

impl PrecopyNotifierChain {
    /// An empty chain with the bulk stage enabled.
    pub fn new() -> Self {
        PrecopyNotifierChain {
            notifiers: Vec::new(),
            next_id: 0,
            bulk_stage: AtomicBool::new(true),
        }
    }

    /// Adds `notifier` at the end of the chain.
    pub fn add(&mut self, notifier: Arc<dyn PrecopyNotifier>) -> NotifierId {
        let id = NotifierId(self.next_id);
        self.next_id += 1;
        self.notifiers.push((id, notifier));
        id
    }

    /// Removes the notifier `id`. Returns whether it was in the chain.
    pub fn remove(&mut self, id: NotifierId) -> bool {
        let before = self.notifiers.len();
        self.notifiers.retain(|(nid, _)| *nid != id);
        self.notifiers.len() != before
    }

    /// Number of notifiers in the chain.
    pub fn len(&self) -> usize {
        self.notifiers.len()
    }

    /// Whether the chain has no notifier.
    pub fn is_empty(&self) -> bool {
        self.notifiers.is_empty()
    }

    /// Re-enables the bulk stage, for the start of a new migration.
    pub fn reset_bulk_stage(&self) {
        self.bulk_stage.store(true, Ordering::Release);
    }

    /// Whether the bulk stage is enabled (no notifier disabled it since the last reset).
    pub fn bulk_stage_enabled(&self) -> bool {
        self.bulk_stage.load(Ordering::Acquire)
    }

    /// Delivers `event` to every notifier, in the order they were added.
    ///
    /// # Errors
    ///
    /// For every event but [`Cleanup`](PrecopyEvent::Cleanup), the first failure stops the
    /// chain and is returned. On `Cleanup` every notifier is called even after a failure (a
    /// cancelled migration must still let each one release what it holds), and all failures
    /// are returned together.
    pub fn notify(&self, event: PrecopyEvent, state: MigrationState) -> Result<(), NotifyError> {
        let ctx = PrecopyContext {
            vm_running: state.vm_running,
            postcopy: state.postcopy,
            bulk_stage: &self.bulk_stage,
        };
        let mut failures = Vec::new();
        for (id, notifier) in &self.notifiers {
            if let Err(source) = notifier.notify(event, &ctx) {
                log::warn!(
                    "precopy notifier '{}' failed on {event}: {source}",
                    notifier.name()
                );
                failures.push(NotifierFailure {
                    id: *id,
                    name: notifier.name().to_owned(),
                    source,
                });
                if event != PrecopyEvent::Cleanup {
                    break;
                }
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(NotifyError { event, failures })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records what it saw into a shared journal; fails on the events in `fail_on`.
    struct Probe {
        name: String,
        journal: Arc<Mutex<Vec<String>>>,
        fail_on: Vec<PrecopyEvent>,
    }

    impl PrecopyNotifier for Probe {
        fn name(&self) -> &str {
            &self.name
        }

        fn notify(
            &self,
            event: PrecopyEvent,
            ctx: &PrecopyContext<'_>,
        ) -> Result<(), NotifierError> {
            self.journal.lock().unwrap().push(format!(
                "{} {event} running={} postcopy={}",
                self.name,
                ctx.vm_running(),
                ctx.postcopy_enabled()
            ));
            if self.fail_on.contains(&event) {
                return Err(format!("{} refuses {event}", self.name).into());
            }
            Ok(())
        }
    }

    fn probe(
        name: &str,
        journal: &Arc<Mutex<Vec<String>>>,
        fail_on: &[PrecopyEvent],
    ) -> Arc<Probe> {
        Arc::new(Probe {
            name: name.to_owned(),
            journal: journal.clone(),
            fail_on: fail_on.to_vec(),
        })
    }

    const RUNNING: MigrationState = MigrationState {
        vm_running: true,
        postcopy: false,
    };

    #[test]
    fn notifies_in_registration_order_with_context() {
        let journal = Arc::new(Mutex::new(Vec::new()));
        let mut chain = PrecopyNotifierChain::new();
        assert!(chain.is_empty());
        chain.add(probe("a", &journal, &[]));
        chain.add(probe("b", &journal, &[]));
        assert_eq!(chain.len(), 2);
        chain
            .notify(
                PrecopyEvent::Complete,
                MigrationState {
                    vm_running: false,
                    postcopy: true,
                },
            )
            .unwrap();
        assert_eq!(
            *journal.lock().unwrap(),
            [
                "a complete running=false postcopy=true",
                "b complete running=false postcopy=true"
            ]
        );
        assert_eq!(
            format!("{chain:?}"),
            "PrecopyNotifierChain { notifiers: [\"a\", \"b\"], bulk_stage: true }"
        );
    }

    #[test]
    fn first_failure_stops_the_chain_and_names_the_notifier() {
        let journal = Arc::new(Mutex::new(Vec::new()));
        let mut chain = PrecopyNotifierChain::new();
        chain.add(probe("a", &journal, &[]));
        let b = chain.add(probe("b", &journal, &[PrecopyEvent::AfterBitmapSync]));
        chain.add(probe("c", &journal, &[]));
        let err = chain
            .notify(PrecopyEvent::AfterBitmapSync, RUNNING)
            .unwrap_err();
        assert_eq!(err.failures.len(), 1);
        assert_eq!(err.failures[0].id, b);
        assert_eq!(err.failures[0].name, "b");
        assert_eq!(
            err.to_string(),
            "precopy after-bitmap-sync notification failed: notifier 'b': b refuses \
             after-bitmap-sync;"
        );
        assert!(std::error::Error::source(&err).is_some());
        assert_eq!(journal.lock().unwrap().len(), 2, "c was not called");
    }

    #[test]
    fn cleanup_reaches_every_notifier_despite_failures() {
        let journal = Arc::new(Mutex::new(Vec::new()));
        let mut chain = PrecopyNotifierChain::new();
        chain.add(probe("a", &journal, &[PrecopyEvent::Cleanup]));
        chain.add(probe("b", &journal, &[]));
        chain.add(probe("c", &journal, &[PrecopyEvent::Cleanup]));
        let err = chain.notify(PrecopyEvent::Cleanup, RUNNING).unwrap_err();
        let names: Vec<&str> = err.failures.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["a", "c"]);
        assert_eq!(journal.lock().unwrap().len(), 3);
    }

    #[test]
    fn remove_takes_only_that_notifier() {
        let journal = Arc::new(Mutex::new(Vec::new()));
        let mut chain = PrecopyNotifierChain::new();
        let a = chain.add(probe("a", &journal, &[]));
        let b = chain.add(probe("b", &journal, &[]));
        assert!(chain.remove(a));
        assert!(!chain.remove(a));
        // Ids are never reused, so a stale id cannot remove a newer notifier.
        let c = chain.add(probe("c", &journal, &[]));
        assert_ne!(a, c);
        chain.notify(PrecopyEvent::Setup, RUNNING).unwrap();
        assert_eq!(
            *journal.lock().unwrap(),
            [
                "b setup running=true postcopy=false",
                "c setup running=true postcopy=false"
            ]
        );
        assert!(chain.remove(b));
        assert!(chain.remove(c));
        assert!(chain.notify(PrecopyEvent::Setup, RUNNING).is_ok());
    }

    struct DisableBulk;
    impl PrecopyNotifier for DisableBulk {
        fn name(&self) -> &str {
            "disable-bulk"
        }
        fn notify(
            &self,
            event: PrecopyEvent,
            ctx: &PrecopyContext<'_>,
        ) -> Result<(), NotifierError> {
            if event == PrecopyEvent::Setup {
                assert!(ctx.bulk_stage_enabled());
                ctx.disable_bulk_stage();
                assert!(!ctx.bulk_stage_enabled());
            }
            Ok(())
        }
    }

    #[test]
    fn a_notifier_can_disable_the_bulk_stage() {
        let mut chain = PrecopyNotifierChain::default();
        chain.add(Arc::new(DisableBulk));
        chain
            .notify(PrecopyEvent::BeforeBitmapSync, RUNNING)
            .unwrap();
        assert!(chain.bulk_stage_enabled());
        chain.notify(PrecopyEvent::Setup, RUNNING).unwrap();
        assert!(!chain.bulk_stage_enabled());
        chain.reset_bulk_stage();
        assert!(chain.bulk_stage_enabled());
    }

    #[test]
    fn events_have_stable_names() {
        let names: Vec<String> = [
            PrecopyEvent::Setup,
            PrecopyEvent::BeforeBitmapSync,
            PrecopyEvent::AfterBitmapSync,
            PrecopyEvent::Complete,
            PrecopyEvent::Cleanup,
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        assert_eq!(
            names,
            [
                "setup",
                "before-bitmap-sync",
                "after-bitmap-sync",
                "complete",
                "cleanup"
            ]
        );
    }
}
