/*
 * gaspar.h: the C ABI of gaspard handler plugins (ABI version 1).
 *
 * A handler is a shared library exporting one function,
 *
 *     const gaspar_handler_v1 *gaspar_handler_entry(void);
 *
 * which returns a pointer to a static table. gaspard loads the library once in
 * each worker process, checks abi_version, calls init once, then calls handle
 * once per request, from one thread at a time. See docs/handler-abi.md.
 *
 * Build, with gaspar.h installed (/usr/include, and gaspar.pc for pkg-config):
 *     cc $(pkg-config --cflags gaspar) -shared -fPIC -O2 -o libmy_handler.so my_handler.c
 * or from a checkout of gaspard:
 *     cc -I path/to/gaspard/handler-abi/include -shared -fPIC -O2 -o libmy_handler.so my_handler.c
 */
#ifndef GASPAR_H
#define GASPAR_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define GASPAR_ABI_VERSION 1

/* Gives a symbol default visibility, so that it is exported from the shared
 * library even when built with -fvisibility=hidden. The declaration of
 * gaspar_handler_entry below carries it, and a definition inherits it, so a
 * handler that includes this header need not repeat it. */
#if defined(__GNUC__) || defined(__clang__)
#define GASPAR_EXPORT __attribute__((visibility("default")))
#else
#define GASPAR_EXPORT
#endif

/* Return codes of init and handle. Any non-zero value is a failure. */
#define GASPAR_OK 0
#define GASPAR_ERROR 1

/* Services the host offers during one call; valid only during that call. */
typedef struct gaspar_host {
    void *ctx;
    /* A host-owned buffer of exactly len bytes that becomes the reply,
     * replacing any earlier one in this call; NULL if it cannot be had.
     * Not calling it means an empty reply. */
    uint8_t *(*reply_buffer)(void *ctx, size_t len);
    /* Records an error message (UTF-8, not NUL-terminated); the host copies it. */
    void (*set_error)(void *ctx, const char *msg, size_t len);
} gaspar_host;

typedef struct gaspar_handler_v1 {
    uint32_t abi_version; /* GASPAR_ABI_VERSION; always the first field */
    const char *name;     /* for logs; may be NULL */
    /* Optional (NULL: state stays NULL). config is the --handler-config string,
     * not NUL-terminated. Store per-worker state in *state. If init fails,
     * shutdown is not called: release anything allocated before failing. */
    int (*init)(const uint8_t *config, size_t config_len, void **state, const gaspar_host *host);
    /* Required (a NULL handle is refused at load). Write the reply through
     * host->reply_buffer. */
    int (*handle)(void *state, const uint8_t *request, size_t request_len, const gaspar_host *host);
    /* Optional: releases state when the worker stops gracefully. */
    void (*shutdown)(void *state);
} gaspar_handler_v1;

/* The one symbol a handler exports. */
GASPAR_EXPORT const gaspar_handler_v1 *gaspar_handler_entry(void);

/* Convenience for handlers: report an error message given as a C string. */
static inline void gaspar_set_error(const gaspar_host *host, const char *msg) {
    size_t len = 0;
    while (msg[len] != '\0') {
        len++;
    }
    host->set_error(host->ctx, msg, len);
}

#ifdef __cplusplus
}
#endif

#endif /* GASPAR_H */
