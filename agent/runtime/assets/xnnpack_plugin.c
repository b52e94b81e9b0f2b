/* A stand-in external delegate for the tests: TFLite's external-delegate plugin interface
 * (tflite_plugin_create_delegate / tflite_plugin_destroy_delegate), the way vendor NPU delegates
 * ship, around the XNNPACK delegate of the TFLite library named by option "tflite_library".
 * Built by agent/runtime/tests/tflite.rs with `cc -shared -fPIC`. */
#include <dlfcn.h>
#include <stddef.h>
#include <string.h>

typedef void *(*create_fn)(const void *options);
typedef void (*delete_fn)(void *delegate);

static void *tflite;

void *tflite_plugin_create_delegate(char **keys, char **values, size_t count,
                                    void (*report_error)(const char *)) {
    const char *path = NULL;
    for (size_t i = 0; i < count; i++) {
        if (strcmp(keys[i], "tflite_library") == 0) path = values[i];
    }
    if (path == NULL) {
        report_error("option tflite_library is required");
        return NULL;
    }
    /* The same path the agent loaded: dlopen returns that same instance of the library. */
    tflite = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (tflite == NULL) {
        report_error(dlerror());
        return NULL;
    }
    create_fn create = (create_fn)dlsym(tflite, "TfLiteXNNPackDelegateCreate");
    if (create == NULL) {
        report_error("the TFLite library has no XNNPACK delegate");
        return NULL;
    }
    return create(NULL);
}

void tflite_plugin_destroy_delegate(void *delegate) {
    ((delete_fn)dlsym(tflite, "TfLiteXNNPackDelegateDelete"))(delegate);
}
