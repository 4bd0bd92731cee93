#ifndef UP_NOTES_H
#define UP_NOTES_H
/*
 * What a C data plane tells its control plane (trio): a bounded queue of notes, each an event
 * with its reason, plus level-triggered flags (progress, counters worth a log line, complete)
 * that coalesce. An eventfd is readable while either is pending, for trio to wait on.
 */
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include "frame.h"

/* --- cffi: what Python sees (csrc/build_ffi.py reads it from here) --- */
/* Notes. */
#define UP_NOTE_CONTROL 1     /* a frame on `channel` awaits the control plane's verdict */
#define UP_NOTE_BAD_FRAME 2   /* the peer broke the protocol on `channel`: text says how */
#define UP_NOTE_EOF 3         /* the peer closed `channel` */
#define UP_NOTE_SOCK_ERROR 4  /* `channel` failed: err; text says where */
#define UP_NOTE_READ_FAILED 5 /* source: request a (offset b) cannot be read, not poison */
#define UP_NOTE_GONE 6        /* source: the served process exited */
#define UP_NOTE_PUSH_DONE 7   /* source: every unit has been offered */
#define UP_NOTE_FATAL 8       /* a local failure (placement, userfaultfd, memory): err, text */
#define UP_NOTE_TARGET_GONE 9 /* destination: the VMM's memory is gone */
#define UP_NOTE_DETACHED 10   /* `channel` was closed as told: its socket is the caller's again */

/* Flags. */
#define UP_FLAG_PROGRESS 1 /* a placement made progress while a waiter asked to hear it */
#define UP_FLAG_LOG 2      /* a counter the control plane logs has moved */
#define UP_FLAG_COMPLETE 4 /* every page is placed (destination) */

typedef struct up_note {
	int32_t what;
	int32_t channel;
	int32_t err;
	int32_t pad;
	uint64_t a, b;
	char text[UP_WHY];
} up_note;

typedef struct up_notes {
	pthread_mutex_t lock;
	up_note *ring;
	uint32_t cap, head, len;
	uint32_t flags; /* atomic */
	int fd;         /* eventfd */
} up_notes;

int up_notes_init(up_notes *q, uint32_t cap);
void up_notes_free(up_notes *q);
/* 0, or -ENOSPC when the queue is full (the caller waits and tries again). */
int up_notes_put(up_notes *q, int what, int channel, int err, uint64_t a, uint64_t b,
		 const char *text);
void up_notes_flag(up_notes *q, uint32_t flags);
int up_notes_fd(const up_notes *q);
/* Take up to cap notes (oldest first) and every flag raised since the last call. */
uint32_t up_notes_take(up_notes *q, up_note *out, uint32_t cap, uint32_t *flags);
/* --- end cffi --- */
#endif
