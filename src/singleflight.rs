//! Single flight: concurrent callers with the same key share one execution, and a finished
//! result stays shared for a while (callers that arrive late reuse it instead of re-running).
//!
//! The execution runs on a task of its own, to its end, even when every caller has stopped
//! waiting: what it obtains may exist nowhere else (a provider that rotates refresh tokens
//! has already spent the old one), so it must not be abandoned and started over.

use futures_util::future::{BoxFuture, FutureExt, Shared};
use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The shared result of a flight, to await (dropping it does not stop the flight).
pub type Flight<V> = Shared<BoxFuture<'static, V>>;

struct Entry<V> {
    result: Flight<V>,
    /// When the work began.
    since: Instant,
    /// When the result became known; unset while the work runs.
    finished: Arc<OnceLock<Instant>>,
}

pub struct SingleFlight<K, V> {
    flights: Arc<Mutex<HashMap<K, Entry<V>>>>,
    reuse: Duration,
}

/// Finished flights are swept once the map grows past this.
const SWEEP_ABOVE: usize = 1024;

impl<K, V> SingleFlight<K, V>
where
    K: Hash + Eq + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub fn new(reuse: Duration) -> Self {
        Self {
            flights: Arc::new(Mutex::new(HashMap::new())),
            reuse,
        }
    }

    /// The flight for `key`: the one under way or recently finished, or `work` started now
    /// on its own task. Returns it, whether this call started it, and when it was started. A
    /// result for which `keep` is false is not shared once known (the next caller starts
    /// again); `lost` is the result if the task dies.
    pub fn run<Fut>(
        &self,
        key: K,
        work: impl FnOnce() -> Fut,
        keep: fn(&V) -> bool,
        lost: V,
    ) -> (Flight<V>, bool, Instant)
    where
        Fut: Future<Output = V> + Send + 'static,
    {
        let Ok(mut map) = self.flights.lock() else {
            // A poisoned map: run unshared rather than not at all.
            let task = tokio::spawn(work());
            let result = async move { task.await.unwrap_or(lost) }.boxed().shared();
            return (result, true, Instant::now());
        };
        let reuse = self.reuse;
        let live = |e: &Entry<V>| e.finished.get().is_none_or(|at| at.elapsed() < reuse);
        if map.len() > SWEEP_ABOVE {
            map.retain(|_, e| live(e));
        }
        if let Some(e) = map.get(&key).filter(|e| live(e)) {
            return (e.result.clone(), false, e.since);
        }
        let since = Instant::now();
        let finished = Arc::new(OnceLock::new());
        // Drops this flight's entry (not a newer one under the same key): the next caller
        // starts again.
        let forget = {
            let (flights, key, finished) = (self.flights.clone(), key.clone(), finished.clone());
            move || {
                if let Ok(mut map) = flights.lock() {
                    if map
                        .get(&key)
                        .is_some_and(|e| Arc::ptr_eq(&e.finished, &finished))
                    {
                        map.remove(&key);
                    }
                }
            }
        };
        let work = work();
        let done = {
            let (finished, forget) = (finished.clone(), forget.clone());
            move |v: &V| {
                let _ = finished.set(Instant::now());
                if !keep(v) {
                    forget();
                }
            }
        };
        let task = tokio::spawn(async move {
            let v = work.await;
            done(&v);
            v
        });
        // A task that died settles nothing either.
        let result = async move {
            task.await.unwrap_or_else(|_| {
                forget();
                lost
            })
        }
        .boxed()
        .shared();
        map.insert(
            key,
            Entry {
                result: result.clone(),
                since,
                finished,
            },
        );
        (result, true, since)
    }

    /// Is there a flight for `key`, under way or finished within the reuse window?
    pub fn contains(&self, key: &K) -> bool {
        let Ok(map) = self.flights.lock() else {
            return false;
        };
        map.get(key)
            .is_some_and(|e| e.finished.get().is_none_or(|at| at.elapsed() < self.reuse))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn always(_: &u32) -> bool {
        true
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let sf = Arc::new(SingleFlight::<u8, u32>::new(Duration::from_secs(60)));
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (sf, runs) = (sf.clone(), runs.clone());
            tasks.push(tokio::spawn(async move {
                let (flight, _, _) = sf.run(
                    1,
                    || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        7
                    },
                    always,
                    0,
                );
                flight.await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 7);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // Reused after finishing.
        let (flight, started, _) = sf.run(1, || async { 8 }, always, 0);
        assert_eq!((flight.await, started), (7, false));
        assert!(sf.contains(&1) && !sf.contains(&2));
    }

    #[tokio::test]
    async fn results_not_kept_run_again() {
        let sf = SingleFlight::<u8, u32>::new(Duration::from_secs(60));
        let (flight, started, _) = sf.run(1, || async { 0 }, |v| *v != 0, 9);
        assert_eq!((flight.await, started), (0, true));
        let (flight, started, _) = sf.run(1, || async { 5 }, |v| *v != 0, 9);
        assert_eq!((flight.await, started), (5, true));
        let (flight, started, _) = sf.run(1, || async { 6 }, |v| *v != 0, 9);
        assert_eq!((flight.await, started), (5, false));
    }

    #[tokio::test]
    async fn a_flight_outlives_callers_that_stop_waiting() {
        let sf = SingleFlight::<u8, u32>::new(Duration::from_secs(60));
        let runs = Arc::new(AtomicUsize::new(0));
        let r = runs.clone();
        let (flight, _, since) = sf.run(
            1,
            || async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                r.fetch_add(1, Ordering::SeqCst);
                3
            },
            always,
            0,
        );
        // The caller gives up long before the work ends...
        assert!(tokio::time::timeout(Duration::from_millis(10), flight)
            .await
            .is_err());
        // ...the next caller joins the same flight, which finishes once, and learns when it
        // began (its wait on it is what is left of the first caller's).
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (flight, started, joined_since) = sf.run(1, || async { 4 }, always, 0);
        assert!(!started);
        assert_eq!(joined_since, since);
        assert_eq!(flight.await, 3);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}
