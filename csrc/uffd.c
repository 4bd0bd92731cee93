/*
 * userfaultfd boundary: fd creation, API/REGISTER, range ioctls and the batched event reader.
 *
 * Every range op returns 0 when the whole range was done, else -errno, and stores the
 * kernel's progress field in *progress: bytes done (EAGAIN = partial), or -errno. When the
 * kernel failed before writing the field (argument validation), *progress is -errno too, so
 * a caller never mistakes an untouched field for progress.
 */
#include "uffd.h"

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

int up_uffd_open_syscall(int user_mode_only)
{
	int flags = O_CLOEXEC | O_NONBLOCK | (user_mode_only ? UFFD_USER_MODE_ONLY : 0);
	long fd = syscall(SYS_userfaultfd, flags);
	return fd < 0 ? -errno : (int)fd;
}

int up_uffd_open_device(void)
{
	int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
	if (dev < 0)
		return -errno;
	int fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
	int err = errno;
	close(dev);
	return fd < 0 ? -err : fd;
}

/* Syscall first; when that is refused (EPERM: unprivileged_userfaultfd=0, ENOSYS: seccomp),
 * the /dev/userfaultfd node, whose access is governed by file permissions instead. */
int up_uffd_open(int user_mode_only, int *via)
{
	int fd = up_uffd_open_syscall(user_mode_only);
	if (fd >= 0) {
		*via = UP_VIA_SYSCALL;
		return fd;
	}
	if (user_mode_only)
		return fd;
	int fd2 = up_uffd_open_device();
	if (fd2 >= 0) {
		*via = UP_VIA_DEVICE;
		return fd2;
	}
	return fd; /* the syscall's error is the more telling one */
}

int up_uffd_api(int fd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out)
{
	struct uffdio_api api = {.api = UFFD_API, .features = features};
	if (ioctl(fd, UFFDIO_API, &api) < 0)
		return -errno;
	*features_out = api.features;
	*ioctls_out = api.ioctls;
	return 0;
}

int up_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out)
{
	struct uffdio_register reg = {.range = {.start = start, .len = len}, .mode = mode};
	if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
		return -errno;
	*ioctls_out = reg.ioctls;
	return 0;
}

int up_uffd_unregister(int fd, uint64_t start, uint64_t len)
{
	struct uffdio_range r = {.start = start, .len = len};
	return ioctl(fd, UFFDIO_UNREGISTER, &r) < 0 ? -errno : 0;
}

int up_uffd_wake(int fd, uint64_t start, uint64_t len)
{
	struct uffdio_range r = {.start = start, .len = len};
	return ioctl(fd, UFFDIO_WAKE, &r) < 0 ? -errno : 0;
}

static void decode(const struct uffd_msg *m, up_event *e)
{
	memset(e, 0, sizeof(*e));
	e->kind = m->event;
	e->fork_fd = -1;
	switch (m->event) {
	case UFFD_EVENT_PAGEFAULT:
		e->flags = (uint32_t)m->arg.pagefault.flags;
		e->address = m->arg.pagefault.address;
		e->tid = m->arg.pagefault.feat.ptid;
		break;
	case UFFD_EVENT_FORK:
		e->fork_fd = (int32_t)m->arg.fork.ufd;
		break;
	case UFFD_EVENT_REMAP:
		e->from_ = m->arg.remap.from;
		e->to = m->arg.remap.to;
		e->len = m->arg.remap.len;
		break;
	case UFFD_EVENT_REMOVE:
	case UFFD_EVENT_UNMAP:
		e->start = m->arg.remove.start;
		e->end = m->arg.remove.end;
		break;
	default:
		break;
	}
}

/* One read() takes every pending message that fits (the kernel copies whole 32-byte
 * messages), so a burst of faults costs one syscall. */
#define UP_READ_CHUNK 128
int up_uffd_read_events(int fd, up_event *out, int cap)
{
	struct uffd_msg buf[UP_READ_CHUNK];
	int n = 0;
	if (cap <= 0)
		return -EINVAL;
	while (n < cap) {
		int want = cap - n < UP_READ_CHUNK ? cap - n : UP_READ_CHUNK;
		ssize_t got = read(fd, buf, (size_t)want * sizeof(struct uffd_msg));
		if (got < 0) {
			if (errno == EINTR)
				continue;
			if (n > 0 || errno == EAGAIN)
				return n;
			return -errno;
		}
		int msgs = (int)(got / (ssize_t)sizeof(struct uffd_msg));
		for (int i = 0; i < msgs; i++)
			decode(&buf[i], &out[n + i]);
		n += msgs;
		if (msgs < want)
			break; /* drained */
	}
	return n;
}

int up_fd_set_nonblock(int fd)
{
	int fl = fcntl(fd, F_GETFL);
	if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
		return -errno;
	return 0;
}
