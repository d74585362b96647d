//! Per-route state that outlives reloads: guards (a trip must hold), shadow statistics and
//! learned noise, traffic counters. One registry type serves all of them; what differs is
//! the key, which says what the state belongs to: a guard to its route's entry as written
//! ([`crate::routes::EntryKey`]), shadow statistics to the route with its answering and
//! shadow backends, traffic to the route's prefix and filters ([`crate::routes::RouteKey`]).
//! A reload renews the registry once, off the request path; requests only read the `Arc`s
//! their snapshot holds.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

/// Values kept across generations by key.
pub struct CarryOver<K, V> {
    kept: Mutex<HashMap<K, Arc<V>>>,
}

impl<K, V> Default for CarryOver<K, V> {
    fn default() -> Self {
        CarryOver {
            kept: Mutex::default(),
        }
    }
}

impl<K: Eq + Hash, V> CarryOver<K, V> {
    /// The values of a new generation, one per key (`None` for a `None` key): a key the
    /// previous generation had gets its value back, a new key gets `make(&key)`. Values
    /// whose keys are gone are passed to `retire` and forgotten.
    pub fn renew<I>(
        &self,
        keys: I,
        mut make: impl FnMut(&K) -> V,
        mut retire: impl FnMut(&V),
    ) -> Vec<Option<Arc<V>>>
    where
        I: IntoIterator<Item = Option<K>>,
    {
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next: HashMap<K, Arc<V>> = HashMap::new();
        let values = keys
            .into_iter()
            .map(|key| {
                let key = key?;
                let value = kept
                    .remove(&key)
                    .or_else(|| next.get(&key).cloned())
                    .unwrap_or_else(|| Arc::new(make(&key)));
                next.insert(key, value.clone());
                Some(value)
            })
            .collect();
        for gone in kept.values() {
            retire(gone);
        }
        *kept = next;
        values
    }

    /// The values kept now.
    pub fn values(&self) -> Vec<Arc<V>> {
        self.kept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// How many values are kept.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.kept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_follow_their_keys_across_generations() {
        let reg: CarryOver<&str, String> = CarryOver::default();
        let mut retired = vec![];
        let first = reg.renew(
            [Some("a"), None, Some("b")],
            |k| format!("{k}1"),
            |v| retired.push(v.clone()),
        );
        assert_eq!(first[0].as_deref().map(String::as_str), Some("a1"));
        assert!(first[1].is_none());
        assert_eq!(reg.len(), 2);
        // Reordered, one gone, one new: kept values are the same allocations.
        let second = reg.renew(
            [Some("c"), Some("a")],
            |k| format!("{k}2"),
            |v| retired.push(v.clone()),
        );
        assert_eq!(second[0].as_deref().map(String::as_str), Some("c2"));
        assert!(Arc::ptr_eq(
            second[1].as_ref().unwrap(),
            first[0].as_ref().unwrap()
        ));
        assert_eq!(retired, ["b1"]);
        assert_eq!(reg.len(), 2);
    }

    #[test]
    fn a_key_twice_in_one_generation_shares_one_value() {
        let reg: CarryOver<u8, u8> = CarryOver::default();
        let v = reg.renew([Some(1), Some(1)], |k| *k, |_| {});
        assert!(Arc::ptr_eq(v[0].as_ref().unwrap(), v[1].as_ref().unwrap()));
        assert_eq!(reg.len(), 1);
    }

    #[test]
    fn an_empty_generation_retires_everything() {
        let reg: CarryOver<u8, u8> = CarryOver::default();
        reg.renew([Some(1), Some(2)], |k| *k, |_| {});
        let mut retired = 0;
        assert!(reg.renew([], |k| *k, |_| retired += 1).is_empty());
        assert_eq!(retired, 2);
        assert!(reg.is_empty());
    }
}
