#ifndef UP_UFFD_H
#define UP_UFFD_H
#include <stdint.h>
#include "uffd_uapi.h"

/* --- cffi: what Python sees (csrc/build_ffi.py reads it from here) --- */
/* How up_uffd_open() got its fd. */
#define UP_VIA_SYSCALL 1
#define UP_VIA_DEVICE 2

/* One decoded uffd_msg; flat so Python reads fields without parsing. */
typedef struct up_event {
	uint32_t kind;    /* UFFD_EVENT_* (0x12 pagefault ... 0x16 unmap) */
	uint32_t flags;   /* pagefault: UFFD_PAGEFAULT_FLAG_{WRITE,WP,MINOR} */
	uint32_t tid;     /* pagefault with THREAD_ID, else 0 */
	int32_t fork_fd;  /* FORK: the child's new userfaultfd, else -1 */
	uint64_t address; /* pagefault address */
	uint64_t start;   /* REMOVE/UNMAP: range [start, end) */
	uint64_t end;
	uint64_t from_;   /* REMAP: from_, to, len */
	uint64_t to;
	uint64_t len;
	uint64_t read_ns; /* pagefault: when read, for a reader that times it (dest_plane), else 0 */
} up_event;

int up_uffd_open_syscall(int user_mode_only);
int up_uffd_open_device(void);
int up_uffd_open(int user_mode_only, int *via);
int up_uffd_api(int fd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out);
int up_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out);
int up_uffd_unregister(int fd, uint64_t start, uint64_t len);
int up_uffd_wake(int fd, uint64_t start, uint64_t len);
int up_uffd_read_events(int fd, up_event *out, int cap);
int up_fd_set_nonblock(int fd);
/* --- end cffi --- */
#endif
