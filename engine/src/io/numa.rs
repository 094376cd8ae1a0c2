//! NUMA placement of the buffer pool's parts (see `ferry_rdma::rails::topology` for the rule
//! that decides the parts): a memory policy set on a range before its pages are faulted in,
//! and a check of where the pages actually landed.

use std::io;

/// `MPOL_PREFERRED`: allocate on the node, and fall back to another only when the node is out
/// of memory (a bound policy would have the OOM killer end the daemon at start-up instead).
const MPOL_PREFERRED: libc::c_long = 1;
/// How many pages of a part [`nodes_of_pages`] looks at.
pub const PAGE_SAMPLES: usize = 64;

/// Asks the kernel to allocate the pages of `ptr..ptr+len` (not yet faulted in) on `node`.
///
/// # Safety
/// `ptr..ptr+len` must be a page-aligned range of this process's own anonymous mapping; the
/// policy changes where its pages come from, never their contents.
pub(super) unsafe fn prefer_node(ptr: *mut u8, len: usize, node: u32) -> io::Result<()> {
    let bits = 8 * std::mem::size_of::<libc::c_ulong>();
    let mut mask = vec![0 as libc::c_ulong; node as usize / bits + 1];
    mask[node as usize / bits] |= 1 << (node as usize % bits);
    // maxnode counts bits; the kernel reads one fewer than given.
    let maxnode = (mask.len() * bits + 1) as libc::c_ulong;
    // SAFETY: mbind(2) with a valid mask of `mask.len()` words; the caller vouches for the
    // range.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            ptr,
            len as libc::c_ulong,
            MPOL_PREFERRED,
            mask.as_ptr(),
            maxnode,
            0 as libc::c_uint,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The nodes holding up to [`PAGE_SAMPLES`] pages spread evenly over `ptr..ptr+len` (faulted
/// in), `page` bytes apart at least; a negative entry is the kernel's error for that page.
///
/// # Safety
/// `ptr..ptr+len` must be this process's own mapping, already faulted in.
pub(super) unsafe fn nodes_of_pages(ptr: *mut u8, len: usize, page: usize) -> io::Result<Vec<i32>> {
    let pages = (len / page).max(1);
    let step = pages.div_ceil(PAGE_SAMPLES);
    let mut addresses: Vec<*mut libc::c_void> = (0..pages)
        .step_by(step)
        // SAFETY (of the add): every sampled page starts inside the range.
        .map(|i| unsafe { ptr.add(i * page) }.cast())
        .collect();
    let mut status = vec![0 as libc::c_int; addresses.len()];
    // SAFETY: move_pages(2) with a null node list only reports where each page is; the
    // arrays have `addresses.len()` entries each.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0 as libc::pid_t,
            addresses.len() as libc::c_ulong,
            addresses.as_mut_ptr(),
            std::ptr::null::<libc::c_int>(),
            status.as_mut_ptr(),
            0 as libc::c_int,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(status)
}

/// Faults in every page of a fresh anonymous mapping (what `MAP_POPULATE` would have done at
/// `mmap`, had the memory policy been set by then).
///
/// # Safety
/// `ptr..ptr+len` must be this process's own fresh anonymous mapping, not yet handed out.
pub(super) unsafe fn fault_in(ptr: *mut u8, len: usize, page: usize) {
    let mut at = 0;
    while at < len {
        // SAFETY: inside the range, which nothing else uses yet; writing the zero a fresh
        // anonymous page already holds changes no contents.
        unsafe { std::ptr::write_volatile(ptr.add(at), 0) };
        at += page;
    }
}
