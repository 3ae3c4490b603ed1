//! Single flight: concurrent callers with the same key share one execution, and a finished
//! result stays shared for a while (callers that arrive late reuse it instead of re-running).

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;

/// A flight in progress (or finished), and when it started or finished.
type Flight<V> = (Arc<OnceCell<V>>, Instant);

pub struct SingleFlight<K, V> {
    flights: Mutex<HashMap<K, Flight<V>>>,
    reuse: Duration,
}

/// Finished flights are swept once the map grows past this.
const SWEEP_ABOVE: usize = 1024;

impl<K: Hash + Eq + Clone, V: Clone> SingleFlight<K, V> {
    pub fn new(reuse: Duration) -> Self {
        Self {
            flights: Mutex::new(HashMap::new()),
            reuse,
        }
    }

    fn flight(&self, key: &K) -> Arc<OnceCell<V>> {
        let Ok(mut map) = self.flights.lock() else {
            return Arc::new(OnceCell::new());
        };
        let reuse = self.reuse;
        if map.len() > SWEEP_ABOVE {
            map.retain(|_, (cell, at)| !cell.initialized() || at.elapsed() < reuse);
        }
        match map.get(key) {
            Some((cell, at)) if !cell.initialized() || at.elapsed() < reuse => cell.clone(),
            _ => {
                let cell = Arc::new(OnceCell::new());
                map.insert(key.clone(), (cell.clone(), Instant::now()));
                cell
            }
        }
    }

    /// Runs `work` for `key` unless a flight for it is under way or recently finished; returns
    /// the shared result and whether this caller ran it.
    pub async fn run<F, Fut>(&self, key: K, work: F) -> (V, bool)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let cell = self.flight(&key);
        let mut ran = false;
        let value = cell
            .get_or_init(|| async {
                ran = true;
                let v = work().await;
                if let Ok(mut map) = self.flights.lock() {
                    // The reuse window starts when the result is known.
                    if let Some(entry) = map.get_mut(&key) {
                        entry.1 = Instant::now();
                    }
                }
                v
            })
            .await
            .clone();
        (value, ran)
    }

    /// Drops a finished result so the next caller runs again.
    pub fn forget(&self, key: &K) {
        if let Ok(mut map) = self.flights.lock() {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let sf = Arc::new(SingleFlight::<u8, u32>::new(Duration::from_secs(60)));
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (sf, runs) = (sf.clone(), runs.clone());
            tasks.push(tokio::spawn(async move {
                sf.run(1, || async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    7
                })
                .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().0, 7);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // Reused after finishing; forgotten, it runs again.
        assert_eq!(sf.run(1, || async { 8 }).await, (7, false));
        sf.forget(&1);
        assert_eq!(sf.run(1, || async { 9 }).await, (9, true));
    }
}
