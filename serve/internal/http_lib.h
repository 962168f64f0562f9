// The one place tandem includes cpp-httplib. Debian's package splits the library: httplib.h holds
// declarations and libcpp-httplib.so the definitions, built with OpenSSL, zlib and Brotli support.
// Those macros change the layout of httplib's classes, so every includer must define them exactly
// as the library was built; include this header, never <httplib.h> directly.
#pragma once

#ifndef CPPHTTPLIB_OPENSSL_SUPPORT
#define CPPHTTPLIB_OPENSSL_SUPPORT
#endif
#ifndef CPPHTTPLIB_ZLIB_SUPPORT
#define CPPHTTPLIB_ZLIB_SUPPORT
#endif
#ifndef CPPHTTPLIB_BROTLI_SUPPORT
#define CPPHTTPLIB_BROTLI_SUPPORT
#endif
#include <httplib.h>
