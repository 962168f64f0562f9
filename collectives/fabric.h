// A small message transport between processes over libfabric, for the snapshot agents' erasure-
// coded fragments (not for training collectives: those use MPI and NCCL).
//
// A Transport is one reliable-datagram endpoint (FI_EP_RDM). Messages are byte buffers with a
// 64-bit user tag; each carries the sender's `self_id`, so a receiver takes messages from any peer
// in one Recv and knows who sent them. Large messages move in chunks (`chunk_bytes`) on tagged
// sends whose tags name sender, message and chunk, so nothing depends on the provider's ordering.
// Bulk traffic is paced to `rate_limit_bytes_per_s` so parity traffic cannot crowd out training
// collectives. Every wait has a deadline. A failed or timed-out Send or Recv leaves the transport
// usable for other peers (a dead peer must not take the others down): its posted buffers are
// cancelled and kept until the transport is destroyed. Only a failure of the endpoint itself (a
// completion-queue error, a malformed header) breaks it for good.
//
// Two implementations with one interface: CreateFabricTransport (libfabric, provider by name,
// default "tcp", falling back to "sockets" when tcp is absent) and InProcessFabric (queues in one
// process, for unit tests of code built on Transport).
//
//   auto a = CreateFabricTransport({.self_id = 0});
//   auto b = CreateFabricTransport({.self_id = 1});
//   auto peer = (*a)->AddPeer((*b)->address());          // or "127.0.0.1:5000"
//   TANDEM_RETURN_IF_ERROR((*a)->Send(*peer, /*tag=*/7, bytes, /*timeout_s=*/10));
//   auto msg = (*b)->Recv(/*timeout_s=*/10);              // msg->source_id == 0, msg->tag == 7
//
// Thread-safety: Send and AddPeer may be called from several threads; Recv from one thread at a
// time. With the libfabric provider progress is manual, so a large Send completes only while the
// receiving side is inside Recv: receive on a thread of its own.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/status.h"

namespace tandem::collectives {

struct FabricOptions {
  std::string provider = "tcp";        // libfabric provider; "tcp" falls back to "sockets"
  std::string bind_host = "127.0.0.1"; // local address to listen on
  int bind_port = 0;                   // 0: any free port (see address())
  uint32_t self_id = 0;                // names this endpoint in every message it sends (< 32768)
  double rate_limit_bytes_per_s = 0;   // pace of Send across all threads; 0 = unlimited
  size_t chunk_bytes = size_t{1} << 20;  // bytes per tagged send of a large message
  double message_timeout_s = 60;       // once a message's header arrived, the rest may take this
};

struct FabricMessage {
  uint32_t source_id = 0;  // the sender's FabricOptions::self_id
  uint64_t tag = 0;        // the sender's tag
  std::vector<uint8_t> bytes;
};

class Transport {
 public:
  virtual ~Transport() = default;

  // This endpoint's address as a string to hand to peers ("fi:<hex of fi_getname>" or
  // "inproc:<n>"). host_port() is "host:port" where the provider uses IP addresses, else "".
  virtual std::string address() const = 0;
  virtual std::string host_port() const = 0;
  virtual std::string provider() const = 0;

  // Makes a peer sendable; `address` is another endpoint's address() or "host:port". Returns the
  // handle Send takes. InvalidArgument for an unparsable address.
  virtual StatusOr<int> AddPeer(const std::string& address) = 0;

  // Sends `bytes` (copied; the caller may reuse them at once) to `peer` and returns once the
  // provider reports every chunk sent. DeadlineExceeded after timeout_s; Unavailable when the
  // peer is unreachable.
  virtual Status Send(int peer, uint64_t tag, std::span<const uint8_t> bytes, double timeout_s) = 0;

  // The next whole message from any peer. DeadlineExceeded when none starts within timeout_s; a
  // message that has started gets FabricOptions::message_timeout_s to finish.
  virtual StatusOr<FabricMessage> Recv(double timeout_s) = 0;
};

// A libfabric endpoint; Unavailable when the provider is absent (the message lists the tried
// providers), Internal for other libfabric failures (with the call and fi_strerror).
StatusOr<std::unique_ptr<Transport>> CreateFabricTransport(const FabricOptions& options);

// In-process endpoints sharing one set of queues (tests). The factory must outlive its endpoints.
class InProcessFabric {
 public:
  InProcessFabric();
  ~InProcessFabric();
  InProcessFabric(const InProcessFabric&) = delete;
  InProcessFabric& operator=(const InProcessFabric&) = delete;

  std::unique_ptr<Transport> CreateEndpoint(const FabricOptions& options);

  struct Hub;

 private:
  std::shared_ptr<Hub> hub_;
};

}  // namespace tandem::collectives
