//! The threads the VMM spawns (vCPUs, device workers, control connections): named, and with
//! stacks well under 2 MiB. A thread's default stack is 2 MiB, which on a host whose
//! transparent huge page policy is `always` can land on a 2 MiB boundary and be backed by a
//! whole huge page however little of it the thread touches: measured in the test bed, one
//! such stack added 2 MiB to the private memory of every restored clone.

use std::io;
use std::thread::{Builder, JoinHandle};

/// Every VMM thread's stack. Nothing the VMM runs recurses deeply or keeps large buffers on
/// the stack (buffers live on the heap); the vCPU loop needs far less.
pub const STACK_SIZE: usize = 512 << 10;

/// Spawns `f` on a thread called `name` with a [`STACK_SIZE`] stack.
pub fn spawn<F, T>(name: impl Into<String>, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    Builder::new()
        .name(name.into())
        .stack_size(STACK_SIZE)
        .spawn(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's stack size, as pthreads reports it.
    fn own_stack_size() -> usize {
        let mut size = 0usize;
        // SAFETY: `attr` is initialised by pthread_getattr_np before it is read and destroyed
        // once; `size` is a valid place for pthread_attr_getstacksize to write.
        unsafe {
            let mut attr = std::mem::zeroed::<libc::pthread_attr_t>();
            assert_eq!(libc::pthread_getattr_np(libc::pthread_self(), &mut attr), 0);
            assert_eq!(libc::pthread_attr_getstacksize(&attr, &mut size), 0);
            libc::pthread_attr_destroy(&mut attr);
        }
        size
    }

    #[test]
    fn test_spawn_names_the_thread_and_sizes_its_stack() {
        let (name, stack) = spawn("hearth-test", || {
            let name = std::thread::current().name().map(str::to_owned);
            (name, own_stack_size())
        })
        .expect("spawn")
        .join()
        .expect("join");

        assert_eq!(name.as_deref(), Some("hearth-test"));
        assert!(
            (STACK_SIZE..2 << 20).contains(&stack),
            "stack of {stack} bytes"
        );
    }
}
