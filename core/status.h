// Status and StatusOr<T>: how tandem reports run-time failures across module boundaries.
//
// A Status is either OK or a code plus a message. Messages say what was expected, what was found
// and where (file, tensor, rank). As an error rises, callers add context with
// TANDEM_RETURN_IF_ERROR / TANDEM_ASSIGN_OR_RETURN, which prefix "file:line: " of the call site.
// Programmer errors (broken invariants) use TANDEM_CHECK, which aborts.
//
//   StatusOr<Config> c = ParseConfig(path);
//   if (!c.ok()) return c.status();
//   TANDEM_ASSIGN_OR_RETURN(auto model, LoadModel(dir));
//
// Thread-safety: values; no shared state.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <variant>

namespace tandem {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,    // bad input from a user: config, file, request
  kNotFound,           // a file, key or tensor that should exist does not
  kOutOfRange,         // a value outside its allowed range
  kFailedPrecondition, // the system is not in a state where the call can run
  kDataLoss,           // truncated or corrupted data
  kResourceExhausted,  // out of memory, disk, pages
  kUnavailable,        // a peer or device is gone
  kDeadlineExceeded,   // a timeout
  kUnimplemented,      // asked for something not built (e.g. CUDA in a CPU-only build)
  kAborted,            // cancelled
  kInternal,           // a foreign library failed
};

const char* StatusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() { return Status(); }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // "INVALID_ARGUMENT: message" or "OK".
  std::string ToString() const;

  // Returns a copy whose message is "context: message". No-op on OK.
  Status WithContext(const std::string& context) const;

  // Explicitly discards a status whose failure the caller decided not to handle.
  void IgnoreError() const {}

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

inline Status InvalidArgumentError(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
inline Status NotFoundError(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
inline Status OutOfRangeError(std::string m) { return {StatusCode::kOutOfRange, std::move(m)}; }
inline Status FailedPreconditionError(std::string m) { return {StatusCode::kFailedPrecondition, std::move(m)}; }
inline Status DataLossError(std::string m) { return {StatusCode::kDataLoss, std::move(m)}; }
inline Status ResourceExhaustedError(std::string m) { return {StatusCode::kResourceExhausted, std::move(m)}; }
inline Status UnavailableError(std::string m) { return {StatusCode::kUnavailable, std::move(m)}; }
inline Status DeadlineExceededError(std::string m) { return {StatusCode::kDeadlineExceeded, std::move(m)}; }
inline Status UnimplementedError(std::string m) { return {StatusCode::kUnimplemented, std::move(m)}; }
inline Status AbortedError(std::string m) { return {StatusCode::kAborted, std::move(m)}; }
inline Status InternalError(std::string m) { return {StatusCode::kInternal, std::move(m)}; }

// Builds a message from streamable parts: StrCat("expected ", 3, " dims, found ", n).
template <typename... Args>
std::string StrCat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

template <typename T>
class [[nodiscard]] StatusOr {
 public:
  StatusOr(const Status& status) : v_(status) {  // NOLINT: implicit by design
    if (status.ok()) std::abort();  // an OK status carries no value
  }
  StatusOr(Status&& status) : v_(std::move(status)) {  // NOLINT
    if (std::get<Status>(v_).ok()) std::abort();
  }
  StatusOr(const T& value) : v_(value) {}  // NOLINT
  StatusOr(T&& value) : v_(std::move(value)) {}  // NOLINT
  template <typename U,
            typename = std::enable_if_t<std::is_constructible_v<T, U&&> &&
                                        !std::is_same_v<std::decay_t<U>, Status> &&
                                        !std::is_same_v<std::decay_t<U>, StatusOr<T>>>>
  StatusOr(U&& value) : v_(T(std::forward<U>(value))) {}  // NOLINT

  bool ok() const { return std::holds_alternative<T>(v_); }
  Status status() const { return ok() ? Status::Ok() : std::get<Status>(v_); }

  // Precondition: ok(). Aborts with the error otherwise.
  T& value() & { CheckOk(); return std::get<T>(v_); }
  const T& value() const& { CheckOk(); return std::get<T>(v_); }
  T&& value() && { CheckOk(); return std::get<T>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

 private:
  void CheckOk() const {
    if (!ok()) {
      std::fprintf(stderr, "StatusOr::value() on error: %s\n",
                   std::get<Status>(v_).ToString().c_str());
      std::abort();
    }
  }
  std::variant<Status, T> v_;
};

namespace internal {
[[noreturn]] void CheckFailed(const char* file, int line, const char* cond, const std::string& msg);
std::string SourceLocation(const char* file, int line);
inline const Status& AsStatus(const Status& s) { return s; }
template <typename T>
Status AsStatus(const StatusOr<T>& s) { return s.status(); }
}  // namespace internal

}  // namespace tandem

#define TANDEM_STATUS_CONCAT_INNER(a, b) a##b
#define TANDEM_STATUS_CONCAT(a, b) TANDEM_STATUS_CONCAT_INNER(a, b)

// Returns early from the enclosing function with the error of `expr`, prefixed by this call site.
#define TANDEM_RETURN_IF_ERROR(expr)                                                       \
  do {                                                                                     \
    const ::tandem::Status tandem_status_ = ::tandem::internal::AsStatus(expr);            \
    if (!tandem_status_.ok())                                                              \
      return tandem_status_.WithContext(::tandem::internal::SourceLocation(__FILE__, __LINE__)); \
  } while (0)

// `lhs = value of expr`, or return its error with this call site as context.
#define TANDEM_ASSIGN_OR_RETURN(lhs, expr) \
  TANDEM_ASSIGN_OR_RETURN_IMPL(TANDEM_STATUS_CONCAT(tandem_statusor_, __LINE__), lhs, expr)
#define TANDEM_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr)                                        \
  auto tmp = (expr);                                                                        \
  if (!tmp.ok())                                                                            \
    return tmp.status().WithContext(::tandem::internal::SourceLocation(__FILE__, __LINE__)); \
  lhs = std::move(tmp).value()

// Aborts with file, line and message when an invariant is broken (programmer error).
#define TANDEM_CHECK(cond)                                                      \
  do {                                                                          \
    if (!(cond)) ::tandem::internal::CheckFailed(__FILE__, __LINE__, #cond, ""); \
  } while (0)
#define TANDEM_CHECK_MSG(cond, ...)                                                            \
  do {                                                                                         \
    if (!(cond))                                                                               \
      ::tandem::internal::CheckFailed(__FILE__, __LINE__, #cond, ::tandem::StrCat(__VA_ARGS__)); \
  } while (0)
// Aborts when a Status is not OK (for tests, tools and places where failure is a bug).
#define TANDEM_CHECK_OK(expr)                                                              \
  do {                                                                                     \
    const ::tandem::Status tandem_status_ = ::tandem::internal::AsStatus(expr);            \
    if (!tandem_status_.ok())                                                              \
      ::tandem::internal::CheckFailed(__FILE__, __LINE__, #expr, tandem_status_.ToString()); \
  } while (0)
