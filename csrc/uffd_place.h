#ifndef UP_UFFD_PLACE_H
#define UP_UFFD_PLACE_H
/*
 * The placement ioctls. The kernel lets COPY, CONTINUE and shmem ZEROPAGE (and MOVE) replace a
 * poison marker, so in the product only the page ledger (ledger.c) includes this header: it
 * checks each page's state first. The benchmark's C reference (harness/) places without a
 * ledger on purpose: it is the floor. Each returns 0 when the whole range was done, else
 * -errno, with the kernel's progress field (bytes done, or -errno) in *progress.
 */
#include <stdint.h>
#include "uffd.h"

/* --- cffi: what Python sees (csrc/build_ffi.py reads it from here) --- */
int up_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *progress);
int up_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *progress);
int up_uffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *progress);
int up_uffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *progress);
int up_uffd_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *progress);
/* --- end cffi --- */
#endif
