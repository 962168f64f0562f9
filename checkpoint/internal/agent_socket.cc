#include "checkpoint/internal/agent_socket.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>

namespace tandem::checkpoint::internal {
namespace {

using Clock = std::chrono::steady_clock;

int MillisLeft(Clock::time_point deadline) {
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return ms < 0 ? 0 : static_cast<int>(std::min<int64_t>(ms, 1 << 30));
}

Clock::time_point After(double s) {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s));
}

StatusOr<sockaddr_un> UnixAddress(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return InvalidArgumentError(StrCat("agent socket path must be 1..", sizeof(addr.sun_path) - 1,
                                       " characters, found '", path, "'"));
  }
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  return addr;
}

}  // namespace

LineConn::~LineConn() {
  if (fd_ >= 0) close(fd_);
}

LineConn& LineConn::operator=(LineConn&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) close(fd_);
    fd_ = o.fd_;
    buffer_ = std::move(o.buffer_);
    o.fd_ = -1;
  }
  return *this;
}

Status LineConn::WriteLine(const std::string& line, double timeout_s) {
  const std::string data = line + "\n";
  const auto deadline = After(timeout_s);
  size_t done = 0;
  while (done < data.size()) {
    pollfd p{fd_, POLLOUT, 0};
    int r = poll(&p, 1, MillisLeft(deadline));
    if (r == 0) return DeadlineExceededError(StrCat("agent socket: write not done in ", timeout_s, " s"));
    if (r < 0 && errno == EINTR) continue;
    ssize_t n = send(fd_, data.data() + done, data.size() - done, MSG_NOSIGNAL);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n <= 0) return UnavailableError(StrCat("agent socket: write failed: ", std::strerror(errno)));
    done += static_cast<size_t>(n);
  }
  return Status::Ok();
}

StatusOr<bool> LineConn::FillOnce() {
  char buf[4096];
  ssize_t n = recv(fd_, buf, sizeof(buf), MSG_DONTWAIT);
  if (n == 0) return UnavailableError("agent socket: the other side closed the connection");
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return false;
    return UnavailableError(StrCat("agent socket: read failed: ", std::strerror(errno)));
  }
  buffer_.append(buf, static_cast<size_t>(n));
  return true;
}

std::string LineConn::TakeLine() {
  size_t nl = buffer_.find('\n');
  std::string line = buffer_.substr(0, nl);
  buffer_.erase(0, nl + 1);
  return line;
}

StatusOr<std::string> LineConn::ReadLine(double timeout_s) {
  const auto deadline = After(timeout_s);
  while (!HasLine()) {
    pollfd p{fd_, POLLIN, 0};
    int r = poll(&p, 1, MillisLeft(deadline));
    if (r == 0) {
      return DeadlineExceededError(StrCat("agent socket: no reply within ", timeout_s, " s"));
    }
    if (r < 0 && errno == EINTR) continue;
    TANDEM_ASSIGN_OR_RETURN(bool got, FillOnce());
    (void)got;
  }
  return TakeLine();
}

StatusOr<LineConn> ConnectUnix(const std::string& path, double timeout_s) {
  TANDEM_ASSIGN_OR_RETURN(sockaddr_un addr, UnixAddress(path));
  const auto deadline = After(timeout_s);
  for (;;) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return InternalError(StrCat("socket(AF_UNIX): ", std::strerror(errno)));
    if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) return LineConn(fd);
    const int err = errno;
    close(fd);
    if (Clock::now() >= deadline) {
      return UnavailableError(StrCat("no snapshot agent at '", path, "' after ", timeout_s,
                                     " s: ", std::strerror(err)));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // the agent may be starting
  }
}

StatusOr<int> ListenUnix(const std::string& path) {
  TANDEM_ASSIGN_OR_RETURN(sockaddr_un addr, UnixAddress(path));
  unlink(path.c_str());
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return InternalError(StrCat("socket(AF_UNIX): ", std::strerror(errno)));
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || listen(fd, 64) != 0) {
    std::string msg = StrCat("agent: cannot listen on '", path, "': ", std::strerror(errno));
    close(fd);
    return UnavailableError(msg);
  }
  return fd;
}

}  // namespace tandem::checkpoint::internal
