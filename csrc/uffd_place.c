/*
 * The placement ioctls (see uffd_place.h). Each returns 0 when the whole range was done, else
 * -errno, and stores the kernel's progress field in *progress: bytes done (EAGAIN = partial),
 * or -errno. When the kernel failed before writing the field (argument validation), *progress
 * is -errno too, so a caller never mistakes an untouched field for progress.
 */
#include "uffd_place.h"

#include <errno.h>
#include <sys/ioctl.h>

/* Marks "kernel did not write the progress field". */
#define UP_UNTOUCHED INT64_MIN

static inline int finish(int rc, int64_t field, int64_t *progress)
{
	if (rc == 0) {
		*progress = field;
		return 0;
	}
	int err = errno;
	*progress = field == UP_UNTOUCHED ? -err : field;
	return -err;
}

int up_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *progress)
{
	struct uffdio_copy a = {.dst = dst, .src = src, .len = len, .mode = mode, .copy = UP_UNTOUCHED};
	int rc = ioctl(fd, UFFDIO_COPY, &a);
	return finish(rc, a.copy, progress);
}

int up_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *progress)
{
	struct uffdio_zeropage a = {.range = {start, len}, .mode = mode, .zeropage = UP_UNTOUCHED};
	int rc = ioctl(fd, UFFDIO_ZEROPAGE, &a);
	return finish(rc, a.zeropage, progress);
}

int up_uffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *progress)
{
	struct uffdio_continue a = {.range = {start, len}, .mode = mode, .mapped = UP_UNTOUCHED};
	int rc = ioctl(fd, UFFDIO_CONTINUE, &a);
	return finish(rc, a.mapped, progress);
}

int up_uffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *progress)
{
	struct uffdio_poison a = {.range = {start, len}, .mode = mode, .updated = UP_UNTOUCHED};
	int rc = ioctl(fd, UFFDIO_POISON, &a);
	return finish(rc, a.updated, progress);
}

int up_uffd_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *progress)
{
	struct uffdio_move a = {.dst = dst, .src = src, .len = len, .mode = mode, .move = UP_UNTOUCHED};
	int rc = ioctl(fd, UFFDIO_MOVE, &a);
	return finish(rc, a.move, progress);
}
