//! The gateway in force: replaced whole when the config is reloaded, and
//! picked up by each worker at its next request, with the worker's own
//! upstream pools for it.

use super::gateway::{Forwarder, Gateway};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// The process's gateway and its generation.
pub struct Live {
    generation: AtomicU64,
    current: RwLock<Arc<Gateway>>,
}

impl Live {
    pub fn new(gateway: Arc<Gateway>) -> Live {
        Live {
            generation: AtomicU64::new(1),
            current: RwLock::new(gateway),
        }
    }

    pub fn gateway(&self) -> Arc<Gateway> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Puts `gateway` in force for every request that starts from now on.
    pub fn replace(&self, gateway: Arc<Gateway>) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = gateway;
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// One worker's view of the live gateway, with the worker's own upstream
/// pools for it.
pub struct WorkerGateway {
    live: Arc<Live>,
    current: Mutex<Snapshot>,
}

/// The gateway a request is served by, and the pools it forwards over.
#[derive(Clone)]
pub struct Snapshot {
    pub generation: u64,
    pub gateway: Arc<Gateway>,
    pub forwarder: Arc<Forwarder>,
}

impl WorkerGateway {
    pub fn new(live: Arc<Live>) -> WorkerGateway {
        let generation = live.generation.load(Ordering::Acquire);
        let gateway = live.gateway();
        let forwarder = Arc::new(gateway.forwarder(None));
        WorkerGateway {
            live,
            current: Mutex::new(Snapshot {
                generation,
                gateway,
                forwarder,
            }),
        }
    }

    /// Whether a snapshot taken at `generation` is still the one in force:
    /// one atomic read, so each request can ask.
    pub fn is_current(&self, generation: u64) -> bool {
        self.live.generation.load(Ordering::Acquire) == generation
    }

    /// The gateway in force and this worker's pools for it (pools whose
    /// upstream and bounds did not change are kept across a reload).
    pub fn snapshot(&self) -> Snapshot {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let generation = self.live.generation.load(Ordering::Acquire);
        if current.generation != generation {
            let gateway = self.live.gateway();
            let forwarder = Arc::new(gateway.forwarder(Some(&current.forwarder)));
            *current = Snapshot {
                generation,
                gateway,
                forwarder,
            };
        }
        current.clone()
    }
}
