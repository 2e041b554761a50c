/*
 * @NAME@: a gaspard handler.
 *
 * Build (or run make):
 *     cc @CFLAGS@ -O2 -Wall -Wextra -shared -fPIC -o lib@LIB@.so @NAME@.c
 * Check and serve:
 *     gaspard --check --handler ./lib@LIB@.so
 *     gaspard --handler ./lib@LIB@.so --handler-config 'hello, '
 *
 * The contract (threads, state, errors) is in gaspard's docs/handler-abi.md.
 */
#include <stdlib.h>
#include <string.h>

#include "gaspar.h"

/* Per-worker state: each worker process builds its own in init. */
struct state {
    /* The --handler-config string, put in front of every reply. */
    size_t prefix_len;
    uint8_t prefix[];
};

/* Runs once in each worker. config is not NUL-terminated. */
static int handler_init(const uint8_t *config, size_t config_len, void **state,
                        const gaspar_host *host) {
    struct state *s = malloc(sizeof *s + config_len);
    if (s == NULL) {
        gaspar_set_error(host, "out of memory");
        return GASPAR_ERROR;
    }
    s->prefix_len = config_len;
    if (config_len > 0) {
        memcpy(s->prefix, config, config_len);
    }
    *state = s;
    return GASPAR_OK;
}

/* Runs once per request: the reply goes into a buffer from the host. A
 * non-zero return fails the request (the client's connection is reset). */
static int handler_handle(void *state, const uint8_t *request, size_t request_len,
                          const gaspar_host *host) {
    struct state *s = state;
    uint8_t *reply = host->reply_buffer(host->ctx, s->prefix_len + request_len);
    if (reply == NULL) {
        gaspar_set_error(host, "no reply buffer");
        return GASPAR_ERROR;
    }
    if (s->prefix_len > 0) {
        memcpy(reply, s->prefix, s->prefix_len);
    }
    memcpy(reply + s->prefix_len, request, request_len);
    return GASPAR_OK;
}

/* Runs when a worker stops gracefully (not after a failed init). */
static void handler_shutdown(void *state) {
    free(state);
}

static const gaspar_handler_v1 handler = {
    .abi_version = GASPAR_ABI_VERSION,
    .name = "@NAME@",
    .init = handler_init,
    .handle = handler_handle,
    .shutdown = handler_shutdown,
};

/* The one exported symbol (gaspar.h declares it GASPAR_EXPORT). */
const gaspar_handler_v1 *gaspar_handler_entry(void) {
    return &handler;
}
