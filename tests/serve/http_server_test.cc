// HttpServer against a FakeEngine: every endpoint, SSE framing byte for byte, error objects and
// status codes, API keys, adapter directories, client disconnects and concurrent streams.
#include "serve/http_server.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <thread>

#include "serve/internal/http_lib.h"
#include "tests/common/testing.h"
#include "tests/serve/http_fake_engine.h"

namespace tandem::serve {
namespace {

using nlohmann::json;
using testing::FakeEngine;

class HttpServerTest : public ::testing::Test {
 protected:
  void StartServer(HttpServerOptions options = {}) {
    std::filesystem::create_directories(tmp_.Join("adapters/new"));
    std::filesystem::create_directories(tmp_.Join("elsewhere"));
    options.port = 0;
    options.adapter_dirs = {tmp_.Join("adapters")};
    options.max_body_bytes = 64 << 10;
    options.max_prompt_tokens = 200;
    options.max_tokens = 100;
    StatusOr<std::unique_ptr<HttpServer>> server = HttpServer::Create(&engine_, options);
    ASSERT_TRUE(server.ok()) << server.status().ToString();
    server_ = std::move(*server);
    ASSERT_GT(server_->port(), 0);
    ASSERT_TRUE(server_->Start().ok());
  }
  void TearDown() override {
    if (server_) server_->Stop();
    engine_.Shutdown();
  }
  httplib::Client Client() {
    httplib::Client c("127.0.0.1", server_->port());
    c.set_read_timeout(10, 0);
    return c;
  }
  httplib::Result Post(const std::string& path, const std::string& body,
                       const httplib::Headers& headers = {}) {
    return Client().Post(path.c_str(), headers, body, "application/json");
  }
  json PostJson(const std::string& path, const json& body, int expected_status) {
    httplib::Result r = Post(path, body.dump());
    EXPECT_TRUE(r) << "no response from " << path;
    if (!r) return json();
    EXPECT_EQ(r->status, expected_status) << r->body;
    return json::parse(r->body, nullptr, false);
  }

  FakeEngine engine_;
  tandem::testing::TempDir tmp_;
  std::unique_ptr<HttpServer> server_;
};

// "created" is the clock's; everything else in a stream is deterministic.
std::string NormalizeCreated(const std::string& s) {
  return std::regex_replace(s, std::regex("\"created\":[0-9]+"), "\"created\":0");
}

void ExpectErrorObject(const httplib::Result& r, int status, const std::string& param,
                       const std::string& what) {
  ASSERT_TRUE(r) << what;
  EXPECT_EQ(r->status, status) << what << ": " << r->body;
  EXPECT_EQ(r->get_header_value("Content-Type"), "application/json") << what;
  json j = json::parse(r->body, nullptr, false);
  ASSERT_TRUE(j.is_object() && j.contains("error")) << what << ": " << r->body;
  const json& e = j["error"];
  EXPECT_TRUE(e["message"].is_string() && !e["message"].get<std::string>().empty()) << what;
  EXPECT_TRUE(e["type"].is_string()) << what;
  ASSERT_TRUE(e.contains("param") && e.contains("code")) << what;
  if (param.empty()) {
    EXPECT_TRUE(e["param"].is_null()) << what << ": " << r->body;
  } else {
    EXPECT_EQ(e["param"], param) << what << ": " << r->body;
  }
}

TEST_F(HttpServerTest, HealthModelsAndMetrics) {
  StartServer();
  httplib::Result h = Client().Get("/health");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 200);
  EXPECT_EQ(h->body, "{\"status\":\"ok\"}");

  httplib::Result m = Client().Get("/v1/models");
  ASSERT_TRUE(m);
  json models = json::parse(m->body);
  EXPECT_EQ(models["object"], "list");
  ASSERT_EQ(models["data"].size(), 2u);
  EXPECT_EQ(models["data"][0]["id"], "base");
  EXPECT_EQ(models["data"][0]["object"], "model");
  EXPECT_TRUE(models["data"][0]["parent"].is_null());
  EXPECT_EQ(models["data"][1]["id"], "ad1");
  EXPECT_EQ(models["data"][1]["parent"], "base");
  EXPECT_EQ(models["data"][1]["max_model_len"], 512);

  PostJson("/v1/completions", {{"model", "base"}, {"prompt", "Hi"}, {"max_tokens", 4}}, 200);
  httplib::Result metrics = Client().Get("/metrics");
  ASSERT_TRUE(metrics);
  const std::string& t = metrics->body;
  for (const char* line :
       {"tandem_time_to_first_token_seconds_count 1\n",
        "tandem_time_to_first_token_seconds_bucket{le=\"+Inf\"} 1\n",
        "# TYPE tandem_time_to_first_token_seconds histogram\n",
        "tandem_time_per_output_token_seconds_count 1\n", "tandem_requests_waiting 2\n",
        "tandem_requests_running 3\n", "tandem_pool_pages{use=\"kv\"} 40\n",
        "tandem_pool_pages{use=\"adapter\"} 7\n", "tandem_pool_pages{use=\"total\"} 100\n",
        "tandem_adapter_loads_total 5\n", "tandem_decode_graph_captures_total 2\n",
        "tandem_decode_graph_replays_total 9\n", "tandem_http_requests_total{status=\"200\"} "}) {
    EXPECT_NE(t.find(line), std::string::npos) << "missing: " << line << "\nin:\n" << t;
  }
}

TEST_F(HttpServerTest, CompletionPassesParametersAndReturnsUsage) {
  StartServer();
  json body = {{"model", "ad1"},     {"prompt", "Hi"},      {"max_tokens", 5},
               {"temperature", 0.5}, {"top_p", 0.9},        {"top_k", 7},
               {"seed", 42},         {"stop", {"x", "yz"}}, {"ignore_eos", true}};
  json r = PostJson("/v1/completions", body, 200);
  EXPECT_EQ(r["object"], "text_completion");
  EXPECT_EQ(r["model"], "ad1");
  EXPECT_EQ(r["choices"][0]["text"], "Hello");
  EXPECT_EQ(r["choices"][0]["finish_reason"], "length");
  EXPECT_TRUE(r["choices"][0]["logprobs"].is_null());
  EXPECT_EQ(r["usage"],
            json({{"prompt_tokens", 3}, {"completion_tokens", 5}, {"total_tokens", 8}}));
  ASSERT_EQ(engine_.requests().size(), 1u);
  const GenerationRequest g = engine_.requests()[0];
  EXPECT_EQ(g.model, "ad1");
  EXPECT_EQ(g.prompt_tokens, (std::vector<int32_t>{256, 'H', 'i'}));  // BOS + bytes
  EXPECT_FLOAT_EQ(g.sampling.temperature, 0.5f);
  EXPECT_FLOAT_EQ(g.sampling.top_p, 0.9f);
  EXPECT_EQ(g.sampling.top_k, 7);
  EXPECT_TRUE(g.sampling.has_seed);
  EXPECT_EQ(g.sampling.seed, 42u);
  EXPECT_EQ(g.sampling.stop, (std::vector<std::string>{"x", "yz"}));
  EXPECT_EQ(g.sampling.max_tokens, 5);
  EXPECT_TRUE(g.sampling.ignore_eos);
  EXPECT_EQ(g.sampling.logprobs, -1);

  // Token-id prompts go to the engine as they are; EOS ends with "stop".
  r = PostJson("/v1/completions", {{"model", "base"}, {"prompt", {7, 8, 9}}, {"max_tokens", 50}},
               200);
  EXPECT_EQ(r["choices"][0]["text"], "Hello, world!");
  EXPECT_EQ(r["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(r["usage"]["completion_tokens"], 14);
  EXPECT_EQ(engine_.requests()[1].prompt_tokens, (std::vector<int32_t>{7, 8, 9}));
  EXPECT_FALSE(engine_.requests()[1].sampling.has_seed);
  EXPECT_FLOAT_EQ(engine_.requests()[1].sampling.temperature, 1.0f);
  PostJson("/v1/completions", {{"model", "base"}, {"prompt", {{1, 2}}}}, 200);
  EXPECT_EQ(engine_.requests()[2].prompt_tokens, (std::vector<int32_t>{1, 2}));
  EXPECT_EQ(engine_.requests()[2].sampling.max_tokens, 16);  // OpenAI's default
}

TEST_F(HttpServerTest, CompletionStreamIsByteExact) {
  StartServer();
  json body = {{"model", "base"},
               {"prompt", "Hi"},
               {"max_tokens", 3},
               {"stream", true},
               {"stream_options", {{"include_usage", true}}}};
  httplib::Result r = Post("/v1/completions", body.dump());
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->get_header_value("Content-Type"), "text/event-stream");
  const std::string head =
      R"(data: {"id":"cmpl-1","object":"text_completion","created":0,"model":"base","choices":[{"index":0,"text":")";
  const std::string expected =
      head + R"(H","logprobs":null,"finish_reason":null}],"usage":null})" + "\n\n" + head +
      R"(e","logprobs":null,"finish_reason":null}],"usage":null})" + "\n\n" + head +
      R"(l","logprobs":null,"finish_reason":"length"}],"usage":null})" + "\n\n" +
      R"(data: {"id":"cmpl-1","object":"text_completion","created":0,"model":"base","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":3,"total_tokens":6}})" +
      "\n\ndata: [DONE]\n\n";
  EXPECT_EQ(NormalizeCreated(r->body), expected);
}

TEST_F(HttpServerTest, ChatStreamIsByteExact) {
  StartServer();
  json body = {{"model", "ad1"},
               {"messages", {{{"role", "user"}, {"content", "Hi"}}}},
               {"max_completion_tokens", 2},
               {"stream", true}};
  httplib::Result r = Post("/v1/chat/completions", body.dump());
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  const std::string head =
      R"(data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":0,"model":"ad1","choices":[{"index":0,"delta":)";
  const std::string expected =
      head + R"({"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]})" +
      "\n\n" + head + R"({"content":"H"},"logprobs":null,"finish_reason":null}]})" + "\n\n" + head +
      R"({"content":"e"},"logprobs":null,"finish_reason":"length"}]})" + "\n\n" +
      "data: [DONE]\n\n";
  EXPECT_EQ(NormalizeCreated(r->body), expected);
  // The fallback template (no chat_template configured) made the prompt.
  const std::vector<int32_t> ids = engine_.requests()[0].prompt_tokens;
  EXPECT_EQ(engine_.tokenizer().Decode(ids), "<bos>user: Hi\nassistant: ");
  EXPECT_EQ(ids[0], 256);
}

TEST_F(HttpServerTest, ChatUsesConfiguredTemplateAndDefaultsMaxTokens) {
  HttpServerOptions options;
  options.chat_template =
      "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
  StartServer(options);
  json body = {{"model", "base"},
               {"messages",
                {{{"role", "system"}, {"content", "Be brief."}},
                 {{"role", "user"}, {"content", {{{"type", "text"}, {"text", "Hi"}}}}}}},
               {"temperature", 0}};
  json r = PostJson("/v1/chat/completions", body, 200);
  EXPECT_EQ(r["object"], "chat.completion");
  EXPECT_EQ(r["choices"][0]["message"],
            json({{"role", "assistant"}, {"content", std::string(testing::kReply)}}));
  EXPECT_EQ(r["choices"][0]["finish_reason"], "stop");
  const GenerationRequest g = engine_.requests()[0];
  const std::string prompt =
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
      "<|im_start|>assistant\n";
  EXPECT_EQ(engine_.tokenizer().Decode(g.prompt_tokens), prompt);
  EXPECT_EQ(g.sampling.temperature, 0.0f);
  // No max_tokens: the room left in the context, capped by the server's limit (100).
  EXPECT_EQ(g.sampling.max_tokens, 100);
}

TEST_F(HttpServerTest, Logprobs) {
  StartServer();
  json r = PostJson("/v1/completions",
                    {{"model", "base"}, {"prompt", "Hi"}, {"max_tokens", 2}, {"logprobs", 2}}, 200);
  json expected = {{"tokens", {"H", "e"}},
                   {"token_logprobs", {-0.25, -0.5}},
                   {"top_logprobs", {{{"H", -0.25}, {"I", -1.25}}, {{"e", -0.5}, {"f", -1.5}}}},
                   {"text_offset", {0, 1}}};
  EXPECT_EQ(r["choices"][0]["logprobs"], expected);
  EXPECT_EQ(engine_.requests()[0].sampling.logprobs, 2);

  r = PostJson("/v1/chat/completions",
               {{"model", "base"},
                {"messages", {{{"role", "user"}, {"content", "x"}}}},
                {"max_tokens", 1},
                {"logprobs", true},
                {"top_logprobs", 1}},
               200);
  json token = {{"token", "H"}, {"logprob", -0.25}, {"bytes", {72}}};
  json content0 = token;
  content0["top_logprobs"] = json::array({token});
  EXPECT_EQ(r["choices"][0]["logprobs"], json({{"content", {content0}}}));
}

TEST_F(HttpServerTest, BadRequestsGetErrorObjects) {
  StartServer();
  const std::string chat_msgs = R"("messages":[{"role":"user","content":"Hi"}])";
  struct Case {
    const char* path;
    std::string body;
    int status;
    const char* param;
  };
  const std::string c = "/v1/completions", ch = "/v1/chat/completions";
  const Case cases[] = {
      {"/v1/completions", "{not json", 400, ""},
      {"/v1/completions", "[1, 2]", 400, ""},
      {"/v1/completions", R"({"prompt":"Hi"})", 400, "model"},
      {"/v1/completions", R"({"model":"nope","prompt":"Hi"})", 404, "model"},
      {"/v1/completions", R"({"model":"base","prompt":"Hi","n":2})", 400, "n"},
      {"/v1/completions", R"({"model":"base","prompt":"Hi","best_of":3})", 400, "best_of"},
      {"/v1/completions", R"({"model":"base","prompt":"Hi","echo":true})", 400, "echo"},
      {"/v1/completions", R"({"model":"base","prompt":"Hi","temperature":"hot"})", 400,
       "temperature"},
      {"/v1/completions", R"({"model":"base","prompt":"Hi","temperature":3})", 400, "temperature"},
      {"/v1/completions", R"({"model":"base","prompt":"Hi","top_p":0})", 400, "top_p"},
      {"/v1/completions", R"({"model":"base","prompt":"Hi","top_k":-2})", 400, "top_k"},
      {"/v1/completions", R"({"model":"base","prompt":"Hi","max_tokens":0})", 400, "max_tokens"},
      {"/v1/completions", R"({"model":"base","prompt":"Hi","max_tokens":1.5})", 400, "max_tokens"},
      {"/v1/completions", R"({"model":"base","prompt":"Hi","max_tokens":101})", 400, "max_tokens"},
      {"/v1/completions", R"({"model":"base","prompt":"Hi","stop":5})", 400, "stop"},
      {"/v1/completions", R"({"model":"base","prompt":"Hi","logprobs":21})", 400, "logprobs"},
      {"/v1/completions", R"({"model":"base","prompt":"Hi","presence_penalty":1})", 400,
       "presence_penalty"},
      {"/v1/completions",
       R"({"model":"base","prompt":"Hi","stream_options":{"include_usage":true}})", 400,
       "stream_options"},
      {"/v1/completions", R"({"model":"base","prompt":"Hi","stream":"yes"})", 400, "stream"},
      {"/v1/completions", R"({"model":"base"})", 400, "prompt"},
      {"/v1/completions", R"({"model":"base","prompt":""})", 400, "prompt"},
      {"/v1/completions", R"({"model":"base","prompt":[]})", 400, "prompt"},
      {"/v1/completions", R"({"model":"base","prompt":[-1]})", 400, "prompt"},
      {"/v1/completions", R"({"model":"base","prompt":[259]})", 400, "prompt"},
      {"/v1/completions", R"({"model":"base","prompt":["a","b"]})", 400, "prompt"},
      {"/v1/completions", R"({"model":"base","prompt":")" + std::string(250, 'a') + "\"}", 400,
       "prompt"},
      {"/v1/chat/completions", R"({"model":"base"})", 400, "messages"},
      {"/v1/chat/completions", R"({"model":"base","messages":[{"role":"wizard","content":"x"}]})",
       400, "messages[0].role"},
      {"/v1/chat/completions",
       R"({"model":"base","messages":[{"role":"user","content":[{"type":"image_url"}]}]})", 400,
       "messages[0].content"},
      {"/v1/chat/completions", R"({"model":"base",)" + chat_msgs + R"(,"top_logprobs":2})", 400,
       "top_logprobs"},
      {"/v1/chat/completions", R"({"model":"nope",)" + chat_msgs + "}", 404, "model"},
      {"/v1/chat/completions",
       R"({"model":"base",)" + chat_msgs + R"(,"max_completion_tokens":1000})", 400, "max_tokens"},
  };
  for (const Case& k : cases) {
    ExpectErrorObject(Post(k.path, k.body), k.status, k.param, k.body);
  }
  EXPECT_TRUE(engine_.requests().empty()) << "a bad request reached the engine";
  // Unknown endpoints and methods are 404 with an error object too.
  ExpectErrorObject(Client().Get("/v1/nothing"), 404, "", "GET /v1/nothing");
  ExpectErrorObject(Client().Get("/v1/completions"), 404, "", "GET /v1/completions");
}

TEST_F(HttpServerTest, OverloadIs503AndLargeBodyIs413) {
  StartServer();
  engine_.overloaded = true;
  httplib::Result r = Post("/v1/completions", R"({"model":"base","prompt":"Hi"})");
  ExpectErrorObject(r, 503, "", "overloaded");
  EXPECT_NE(r->body.find("queue full"), std::string::npos);
  engine_.overloaded = false;
  const std::string big = R"({"model":"base","prompt":")" + std::string(70 << 10, 'a') + "\"}";
  ExpectErrorObject(Post("/v1/completions", big), 413, "", "large body");
  // The server still serves after refusing.
  PostJson("/v1/completions", {{"model", "base"}, {"prompt", "Hi"}, {"max_tokens", 1}}, 200);
}

TEST_F(HttpServerTest, EngineFailureMidGeneration) {
  StartServer();
  engine_.fail_after_first_token = true;
  httplib::Result r = Post("/v1/completions", R"({"model":"base","prompt":"Hi"})");
  ExpectErrorObject(r, 500, "", "engine failure");
  EXPECT_NE(r->body.find("device lost"), std::string::npos) << r->body;
  // A stream has already sent 200: the error arrives as an event, then [DONE].
  r = Post("/v1/completions", R"({"model":"base","prompt":"Hi","stream":true})");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  const std::string tail =
      R"(data: {"error":{"message":"generation failed: device lost","type":"internal_error",)"
      R"("param":null,"code":null}})"
      "\n\ndata: [DONE]\n\n";
  ASSERT_GE(r->body.size(), tail.size()) << r->body;
  EXPECT_EQ(r->body.substr(r->body.size() - tail.size()), tail) << r->body;
  EXPECT_EQ(r->body.find("data: {\"id\""), 0u) << "the first token comes before the error";
}

TEST_F(HttpServerTest, ApiKey) {
  HttpServerOptions options;
  options.api_key = "sekret";
  StartServer(options);
  const std::string body = R"({"model":"base","prompt":"Hi","max_tokens":1})";
  httplib::Result r = Post("/v1/completions", body);
  ExpectErrorObject(r, 401, "", "no key");
  EXPECT_NE(r->body.find("invalid_api_key"), std::string::npos);
  ExpectErrorObject(Post("/v1/completions", body, {{"Authorization", "Bearer wrong"}}), 401, "",
                    "wrong key");
  ExpectErrorObject(Client().Get("/v1/models"), 401, "", "models without key");
  r = Post("/v1/completions", body, {{"Authorization", "Bearer sekret"}});
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(Client().Get("/health")->status, 200);  // probes need no key
  EXPECT_EQ(engine_.requests().size(), 1u);
}

TEST_F(HttpServerTest, LoadAndUnloadAdaptersOnlyFromAdapterDirs) {
  StartServer();
  const std::string inside = tmp_.Join("adapters/new");
  httplib::Result ok =
      Post("/v1/load_lora_adapter", json({{"lora_name", "new1"}, {"lora_path", inside}}).dump());
  ASSERT_TRUE(ok);
  EXPECT_EQ(ok->status, 200) << ok->body;
  json models = json::parse(Client().Get("/v1/models")->body);
  bool listed = false;
  for (const json& m : models["data"]) {
    if (m["id"] == "new1") {
      listed = true;
      EXPECT_EQ(m["root"], std::filesystem::canonical(inside).string());
      EXPECT_EQ(m["parent"], "base");
    }
  }
  EXPECT_TRUE(listed) << models.dump();

  std::filesystem::create_symlink(tmp_.Join("elsewhere"), tmp_.Join("adapters/link"));
  struct Case {
    json body;
    int status;
    const char* param;
  };
  const Case cases[] = {
      {{{"lora_name", "new1"}, {"lora_path", inside}}, 400, "lora_path"},  // name taken
      {{{"lora_name", "x"}, {"lora_path", tmp_.Join("elsewhere")}}, 400, "lora_path"},
      {{{"lora_name", "x"}, {"lora_path", tmp_.Join("adapters/../elsewhere")}}, 400, "lora_path"},
      {{{"lora_name", "x"}, {"lora_path", tmp_.Join("adapters/link")}}, 400, "lora_path"},
      {{{"lora_name", "x"}, {"lora_path", tmp_.Join("adapters/missing")}}, 400, "lora_path"},
      {{{"lora_path", inside}}, 400, "lora_name"},
      {{{"lora_name", "x"}}, 400, "lora_path"},
  };
  for (const Case& k : cases) {
    ExpectErrorObject(Post("/v1/load_lora_adapter", k.body.dump()), k.status, k.param,
                      k.body.dump());
  }
  httplib::Result escape =
      Post("/v1/load_lora_adapter",
           json({{"lora_name", "x"}, {"lora_path", tmp_.Join("elsewhere")}}).dump());
  EXPECT_NE(escape->body.find("outside the adapter directories"), std::string::npos);

  ok = Post("/v1/unload_lora_adapter", R"({"lora_name":"new1"})");
  ASSERT_TRUE(ok);
  EXPECT_EQ(ok->status, 200) << ok->body;
  ExpectErrorObject(Post("/v1/unload_lora_adapter", R"({"lora_name":"new1"})"), 404, "lora_name",
                    "unload twice");
  ExpectErrorObject(Post("/v1/unload_lora_adapter", "{}"), 400, "lora_name", "no name");
}

TEST_F(HttpServerTest, ClientDisconnectCancelsTheRequest) {
  engine_.token_delay = std::chrono::milliseconds(20);
  StartServer();
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/completions";
  req.headers = {{"Content-Type", "application/json"}};
  req.body = R"({"model":"base","prompt":"Hi","max_tokens":100,"stream":true,"ignore_eos":true})";
  int chunks = 0;
  req.content_receiver = [&](const char*, size_t, uint64_t, uint64_t) { return ++chunks < 2; };
  httplib::Client client = Client();
  client.send(req);  // fails once the receiver stops reading: the connection is closed
  EXPECT_EQ(chunks, 2);
  for (int i = 0; i < 200 && engine_.cancels() == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(engine_.cancels(), 1);
}

TEST_F(HttpServerTest, StopEndsOpenStreams) {
  engine_.token_delay = std::chrono::milliseconds(50);
  StartServer();
  std::string body;
  std::thread client([&] {
    httplib::Result r =
        Post("/v1/completions", R"({"model":"base","prompt":"Hi","max_tokens":100,"stream":true})");
    if (r) body = r->body;
  });
  for (int i = 0; i < 200 && engine_.requests().empty(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_EQ(engine_.requests().size(), 1u);
  server_->Stop();  // must not wait for the 100 tokens (5 s)
  client.join();
  EXPECT_EQ(engine_.cancels(), 1);
  // The stream ended properly: an "abort" chunk, then [DONE].
  EXPECT_NE(body.find("\"finish_reason\":\"abort\""), std::string::npos) << body;
  EXPECT_EQ(body.substr(body.size() - 14), "data: [DONE]\n\n") << body;
}

TEST_F(HttpServerTest, ThirtyTwoConcurrentStreams) {
  engine_.token_delay = std::chrono::milliseconds(2);
  StartServer();
  constexpr int kClients = 32;
  std::vector<std::string> bodies(kClients);
  std::vector<std::thread> threads;
  for (int i = 0; i < kClients; ++i) {
    threads.emplace_back([&, i] {
      json body = {{"model", i % 2 ? "ad1" : "base"},
                   {"prompt", "Hi"},
                   {"max_tokens", 1 + i % 14},
                   {"stream", true}};
      httplib::Result r = Post("/v1/completions", body.dump());
      bodies[i] = r ? r->body : "client error " + std::to_string(static_cast<int>(r.error()));
    });
  }
  for (std::thread& t : threads) t.join();
  for (int i = 0; i < kClients; ++i) {
    // Reassemble the text from the data lines; the stream must end with [DONE].
    std::string text, finish;
    size_t pos = 0, events = 0;
    while ((pos = bodies[i].find("data: {", pos)) != std::string::npos) {
      const size_t end = bodies[i].find("\n\n", pos);
      ASSERT_NE(end, std::string::npos);
      json chunk = json::parse(bodies[i].substr(pos + 6, end - pos - 6));
      EXPECT_EQ(chunk["model"], i % 2 ? "ad1" : "base");
      text += chunk["choices"][0]["text"].get<std::string>();
      const json& reason = chunk["choices"][0]["finish_reason"];
      if (!reason.is_null()) finish = reason.get<std::string>();
      pos = end;
      ++events;
    }
    const int n = 1 + i % 14;
    EXPECT_EQ(text, std::string(testing::kReply).substr(0, std::min(n, 13))) << "client " << i;
    EXPECT_EQ(finish, n == 14 ? "stop" : "length") << "client " << i;
    EXPECT_EQ(events, static_cast<size_t>(n)) << "client " << i;
    EXPECT_TRUE(bodies[i].size() > 14 &&
                bodies[i].compare(bodies[i].size() - 14, 14, "data: [DONE]\n\n") == 0)
        << "client " << i << ": " << bodies[i];
  }
  EXPECT_EQ(engine_.requests().size(), static_cast<size_t>(kClients));
}

}  // namespace
}  // namespace tandem::serve
