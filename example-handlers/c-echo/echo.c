/*
 * libecho_c.so: the echo handler written in C against gaspar.h.
 *
 * It keeps per-worker state (a request counter) to show init and shutdown.
 * Build by hand:  cc -shared -fPIC -O2 -I ../../handler-abi/include echo.c -o libecho_c.so
 */
#include <stdlib.h>
#include <string.h>

#include "gaspar.h"

struct echo_state {
    unsigned long long requests;
};

static int echo_init(const uint8_t *config, size_t config_len, void **state,
                     const gaspar_host *host) {
    (void)config;
    (void)config_len;
    struct echo_state *s = calloc(1, sizeof *s);
    if (s == NULL) {
        gaspar_set_error(host, "out of memory");
        return GASPAR_ERROR;
    }
    *state = s;
    return GASPAR_OK;
}

static int echo_handle(void *state, const uint8_t *request, size_t request_len,
                       const gaspar_host *host) {
    struct echo_state *s = state;
    s->requests++;
    if (request_len == 0) {
        return GASPAR_OK;
    }
    uint8_t *reply = host->reply_buffer(host->ctx, request_len);
    if (reply == NULL) {
        gaspar_set_error(host, "no reply buffer");
        return GASPAR_ERROR;
    }
    memcpy(reply, request, request_len);
    return GASPAR_OK;
}

static void echo_shutdown(void *state) {
    free(state);
}

static const gaspar_handler_v1 echo_handler = {
    .abi_version = GASPAR_ABI_VERSION,
    .name = "echo_c",
    .init = echo_init,
    .handle = echo_handle,
    .shutdown = echo_shutdown,
};

const gaspar_handler_v1 *gaspar_handler_entry(void) {
    return &echo_handler;
}
