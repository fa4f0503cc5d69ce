//! Each thread's scratch buffers, kept between calls (fresh buffers each call cost a kernel a page
//! clearing each time): both executors' per-image work borrows them through `with_scratch`.

use std::cell::RefCell;
use std::thread::LocalKey;

/// Runs `f` on the first `len` values of this thread's `scratch` (grown as needed; what it held
/// before is left in it: every user writes what it reads). A thread already inside `f` for the same
/// scratch gets a fresh buffer instead: one that waits in a parallel op may run another executor's
/// step meanwhile (rayon lets a waiting thread take other jobs), which can ask for it again.
pub(crate) fn with_scratch<T: Clone + Default, R>(
    scratch: &'static LocalKey<RefCell<Vec<T>>>,
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    scratch.with(|s| match s.try_borrow_mut() {
        Ok(mut s) => {
            if s.len() < len {
                s.resize(len, T::default());
            }
            f(&mut s[..len])
        }
        Err(_) => f(&mut vec![T::default(); len]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        static SCRATCH: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    }

    #[test]
    fn a_scratch_asked_for_again_inside_its_use_is_a_second_buffer() {
        with_scratch(&SCRATCH, 4, |outer| {
            outer.fill(1);
            with_scratch(&SCRATCH, 8, |inner| {
                assert_eq!(inner.len(), 8);
                inner.fill(2);
            });
            assert_eq!(outer, [1, 1, 1, 1]);
        });
        // The kept buffer is the outer one, as it was left.
        with_scratch(&SCRATCH, 4, |again| assert_eq!(again, [1, 1, 1, 1]));
    }
}
