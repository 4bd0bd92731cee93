/* Guest-memory stand-ins: private anon, shmem memfd, hugetlb memfd (each shared kind with an
 * unregistered alias mapping of the same file, used to fill the page cache for MINOR mode). */
#include "memory.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int64_t up_map_anon(uint64_t size, int noreserve)
{
	int flags = MAP_PRIVATE | MAP_ANONYMOUS | (noreserve ? MAP_NORESERVE : 0);
	void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, flags, -1, 0);
	return p == MAP_FAILED ? -errno : (int64_t)(uintptr_t)p;
}

int64_t up_map_file(int fd, uint64_t size, uint64_t *alias_out)
{
	void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		return -errno;
	void *alias = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (alias == MAP_FAILED) {
		int err = errno;
		munmap(p, size);
		return -err;
	}
	*alias_out = (uint64_t)(uintptr_t)alias;
	return (int64_t)(uintptr_t)p;
}

int64_t up_map_memfd(uint64_t size, int hugetlb, int *fd_out, uint64_t *alias_out)
{
	unsigned mfd = MFD_CLOEXEC | (hugetlb ? MFD_HUGETLB | MFD_HUGE_2MB : 0);
	int fd = memfd_create(hugetlb ? "uffdpoison-hugetlb" : "uffdpoison-shmem", mfd);
	if (fd < 0)
		return -errno;
	int64_t addr = ftruncate(fd, (off_t)size) < 0 ? -errno : up_map_file(fd, size, alias_out);
	if (addr < 0)
		close(fd);
	else
		*fd_out = fd;
	return addr;
}

int up_unmap(uint64_t addr, uint64_t size)
{
	return munmap((void *)(uintptr_t)addr, size) < 0 ? -errno : 0;
}

int up_madvise(uint64_t addr, uint64_t len, int advice)
{
	return madvise((void *)(uintptr_t)addr, len, advice) < 0 ? -errno : 0;
}

void up_memcpy(uint64_t dst, uint64_t src, uint64_t len)
{
	memcpy((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, len);
}
