//! Each thread's scratch buffers, kept between calls (fresh buffers each call cost a kernel a page
//! clearing each time): both executors' per-image work borrows them through `with_scratch`.

use std::cell::RefCell;
use std::thread::LocalKey;

/// Runs `f` on the first `len` values of this thread's `scratch` (grown as needed; what it held
/// before is left in it: every user writes what it reads).
pub(crate) fn with_scratch<T: Clone + Default, R>(
    scratch: &'static LocalKey<RefCell<Vec<T>>>,
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    scratch.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < len {
            s.resize(len, T::default());
        }
        f(&mut s[..len])
    })
}
