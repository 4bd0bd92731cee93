/* The notes a data plane leaves for its control plane (see notes.h). */
#include "notes.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

int up_notes_init(up_notes *q, uint32_t cap)
{
	memset(q, 0, sizeof(*q));
	q->ring = calloc(cap, sizeof(*q->ring));
	q->fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (!q->ring || q->fd < 0) {
		int err = q->fd < 0 ? errno : ENOMEM;
		free(q->ring);
		if (q->fd >= 0)
			close(q->fd);
		return -err;
	}
	q->cap = cap;
	pthread_mutex_init(&q->lock, NULL);
	return 0;
}

void up_notes_free(up_notes *q)
{
	if (!q->ring)
		return;
	pthread_mutex_destroy(&q->lock);
	free(q->ring);
	close(q->fd);
	q->ring = NULL;
}

static void signal_fd(int fd)
{
	uint64_t one = 1;
	ssize_t r = write(fd, &one, sizeof(one));
	(void)r; /* EAGAIN: the counter is already non-zero, which is all it needs to be */
}

int up_notes_put(up_notes *q, int what, int channel, int err, uint64_t a, uint64_t b,
		 const char *text)
{
	pthread_mutex_lock(&q->lock);
	if (q->len == q->cap) {
		pthread_mutex_unlock(&q->lock);
		return -ENOSPC;
	}
	up_note *n = &q->ring[(q->head + q->len++) % q->cap];
	memset(n, 0, sizeof(*n));
	n->what = what;
	n->channel = channel;
	n->err = err;
	n->a = a;
	n->b = b;
	if (text)
		strncpy(n->text, text, sizeof(n->text) - 1);
	pthread_mutex_unlock(&q->lock);
	signal_fd(q->fd);
	return 0;
}

void up_notes_flag(up_notes *q, uint32_t flags)
{
	if ((__atomic_fetch_or(&q->flags, flags, __ATOMIC_ACQ_REL) & flags) != flags)
		signal_fd(q->fd);
}

int up_notes_fd(const up_notes *q)
{
	return q->fd;
}

uint32_t up_notes_take(up_notes *q, up_note *out, uint32_t cap, uint32_t *flags)
{
	uint64_t v;
	ssize_t r = read(q->fd, &v, sizeof(v)); /* first: a note put after it signals again */
	(void)r;
	*flags = __atomic_exchange_n(&q->flags, 0, __ATOMIC_ACQ_REL);
	pthread_mutex_lock(&q->lock);
	uint32_t n = q->len < cap ? q->len : cap;
	for (uint32_t i = 0; i < n; i++)
		out[i] = q->ring[(q->head + i) % q->cap];
	q->head = (q->head + n) % q->cap;
	q->len -= n;
	if (q->len)
		signal_fd(q->fd); /* more than cap: readable again */
	pthread_mutex_unlock(&q->lock);
	return n;
}
