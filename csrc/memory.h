#ifndef UP_MEMORY_H
#define UP_MEMORY_H
#include <stdint.h>
#include <stddef.h>
#include <sys/mman.h>

#ifndef MFD_HUGETLB
#define MFD_HUGETLB 0x0004U
#endif
#ifndef MFD_HUGE_2MB
#define MFD_HUGE_2MB (21U << 26)
#endif

/* --- cffi: what Python sees (csrc/build_ffi.py reads it from here) --- */
/* Mappings return the address, or -errno (user addresses are below 2^63). */
int64_t up_map_anon(uint64_t size, int noreserve);
int64_t up_map_memfd(uint64_t size, int hugetlb, int *fd_out, uint64_t *alias_out);
/* A file's first `size` bytes, MAP_SHARED, twice: the mapping (returned) and an alias. */
int64_t up_map_file(int fd, uint64_t size, uint64_t *alias_out);
int up_unmap(uint64_t addr, uint64_t size);
int up_madvise(uint64_t addr, uint64_t len, int advice);
/* memcpy from C, so the GIL is released while a touch of registered memory may block. */
void up_memcpy(uint64_t dst, uint64_t src, uint64_t len);
/* --- end cffi --- */
#endif
