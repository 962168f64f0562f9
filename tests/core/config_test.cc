#include "core/config.h"

#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <random>

#include "tests/common/testing.h"

namespace tandem {
namespace {

// Expects `sub` inside `text`; prints the whole text when it is not.
#define EXPECT_CONTAINS(text, sub)                                    \
  do {                                                                \
    const std::string text_ = (text);                                 \
    EXPECT_NE(text_.find(sub), std::string::npos) << "in: " << text_; \
  } while (0)

struct TrainConfig {
  int64_t steps = 100;
  double lr = 3e-4;
  std::string schedule = "cosine";
  std::vector<int64_t> dims;
  static void Describe(ConfigSchema<TrainConfig>& s) {
    s.Field("steps", &TrainConfig::steps, "optimizer steps to run").Min(1);
    s.Field("lr", &TrainConfig::lr, "peak learning rate").Min(0.0);
    s.Field("schedule", &TrainConfig::schedule, "learning-rate schedule")
        .OneOf({"cosine", "linear", "constant"});
    s.Field("dims", &TrainConfig::dims, "hidden sizes").Min(1);
  }
};

// One field of every supported type.
struct AllTypes {
  bool flag = false;
  int32_t small = 7;
  int64_t big = 1;
  float f = 0.5f;
  double d = 0.25;
  std::string name = "base";
  std::vector<int64_t> ints = {1, 2};
  std::vector<double> reals;
  std::vector<std::string> names = {"x"};
  static void Describe(ConfigSchema<AllTypes>& s) {
    s.Field("flag", &AllTypes::flag, "a switch");
    s.Field("small", &AllTypes::small, "an int32").Min(-5).Max(1000);
    s.Field("big", &AllTypes::big, "an int64");
    s.Field("f", &AllTypes::f, "a float");
    s.Field("d", &AllTypes::d, "a double").Max(10.0);
    s.Field("name", &AllTypes::name, "a name");
    s.Field("ints", &AllTypes::ints, "some ints");
    s.Field("reals", &AllTypes::reals, "some reals");
    s.Field("names", &AllTypes::names, "some names").OneOf({"x", "y", "z"});
  }
};

ConfigDoc Parse(std::string_view text, std::string name = "x.toml") {
  StatusOr<ConfigDoc> doc = ConfigDoc::FromTomlString(text, std::move(name));
  TANDEM_CHECK_OK(doc);
  return std::move(doc).value();
}

// Binds `section` from `text` and returns the error message ("" when OK).
template <class S>
std::string BindError(std::string_view text, std::string_view section = "train") {
  ConfigDoc doc = Parse(text);
  S out;
  Status s = doc.Bind(section, &out);
  if (s.ok()) return "";
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  return s.message();
}

TEST(ConfigTest, BindsValuesAndKeepsDefaults) {
  ConfigDoc doc = Parse("[train]\nsteps = 5\ndims = [4, 8]\n");
  TrainConfig c;
  ASSERT_TRUE(doc.Bind("train", &c).ok());
  EXPECT_EQ(c.steps, 5);
  EXPECT_EQ(c.dims, (std::vector<int64_t>{4, 8}));
  EXPECT_DOUBLE_EQ(c.lr, 3e-4);
  EXPECT_EQ(c.schedule, "cosine");
  EXPECT_TRUE(doc.CheckNoUnknownKeys().ok());
}

TEST(ConfigTest, MissingSectionKeepsDefaults) {
  ConfigDoc doc = Parse("");
  TrainConfig c;
  c.steps = 42;
  ASSERT_TRUE(doc.Bind("train", &c).ok());
  EXPECT_EQ(c.steps, 42);
}

TEST(ConfigTest, WrongTypeNamesKeySourceExpectedAndFound) {
  const std::string e = BindError<TrainConfig>("[train]\n\nlr = \"fast\"\n");
  EXPECT_CONTAINS(e, "'train.lr'");
  EXPECT_CONTAINS(e, "x.toml:3");
  EXPECT_CONTAINS(e, "expected double");
  EXPECT_CONTAINS(e, "found string \"fast\"");
}

TEST(ConfigTest, IntAcceptedForFloatButFloatRejectedForInt) {
  ConfigDoc doc = Parse("[train]\nlr = 2\n");
  TrainConfig c;
  ASSERT_TRUE(doc.Bind("train", &c).ok());
  EXPECT_EQ(c.lr, 2.0);
  const std::string e = BindError<TrainConfig>("[train]\nsteps = 1.5\n");
  EXPECT_CONTAINS(e, "'train.steps' (x.toml:2): expected int64, found float 1.5");
}

TEST(ConfigTest, Int32OverflowAndListElementErrors) {
  EXPECT_CONTAINS(BindError<AllTypes>("[a]\nsmall = 3000000000\n", "a"), "outside the int32 range");
  EXPECT_CONTAINS(BindError<AllTypes>("[a]\nints = [1, \"two\"]\n", "a"),
                  "'a.ints' (x.toml:2): expected list of int64, found element [1] = string");
  EXPECT_CONTAINS(BindError<AllTypes>("[a]\nreals = 3.0\n", "a"),
                  "expected list of double, found float 3.0");
}

TEST(ConfigTest, OutOfRangeNamesAllowedRange) {
  std::string e = BindError<TrainConfig>("[train]\nsteps = 0\n");
  EXPECT_CONTAINS(e, "'train.steps' (x.toml:2): value 0 is out of range (allowed: >= 1)");
  e = BindError<AllTypes>("[a]\nsmall = 1001\n", "a");
  EXPECT_CONTAINS(e, "value 1001 is out of range (allowed: range [-5, 1000])");
  e = BindError<AllTypes>("[a]\nd = 10.5\n", "a");
  EXPECT_CONTAINS(e, "value 10.5 is out of range (allowed: <= 10.0)");
  e = BindError<TrainConfig>("[train]\ndims = [3, 0]\n");
  EXPECT_CONTAINS(e, "element [1]: value 0 is out of range (allowed: >= 1)");
}

TEST(ConfigTest, BadChoiceListsChoices) {
  const std::string e = BindError<TrainConfig>("[train]\nschedule = \"cosin\"\n");
  EXPECT_CONTAINS(e,
                  "'train.schedule' (x.toml:2): value \"cosin\" is not allowed "
                  "(one of: cosine, linear, constant)");
  EXPECT_CONTAINS(BindError<AllTypes>("[a]\nnames = [\"x\", \"w\"]\n", "a"),
                  "element [1]: value \"w\" is not allowed (one of: x, y, z)");
}

TEST(ConfigTest, ReportsEveryBadFieldAndLeavesOutputUntouched) {
  ConfigDoc doc = Parse("[train]\nsteps = 0\nlr = true\nschedule = \"linear\"\n");
  TrainConfig c;
  Status s = doc.Bind("train", &c);
  ASSERT_FALSE(s.ok());
  EXPECT_CONTAINS(s.message(), "train.steps");
  EXPECT_CONTAINS(s.message(), "train.lr");
  EXPECT_EQ(c.schedule, "cosine");  // the good field was not applied either
}

TEST(ConfigTest, SectionThatIsNotATable) {
  EXPECT_CONTAINS(BindError<TrainConfig>("train = 3\n"),
                  "'train' (x.toml:1): expected a table [train], found integer 3");
}

TEST(ConfigTest, UnknownKeySuggestsNearest) {
  ConfigDoc doc = Parse("[train]\nsteps = 2\n\nlrr = 0.1\n");
  TrainConfig c;
  ASSERT_TRUE(doc.Bind("train", &c).ok());
  Status s = doc.CheckNoUnknownKeys();
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "unknown key 'train.lrr' (x.toml:4); did you mean 'train.lr'?");
}

TEST(ConfigTest, UnknownSectionAndAllUnknownsInOneMessage) {
  ConfigDoc doc = Parse(
      "[train]\nstpes = 1\nzzzzzzzz = 1\n[a]\nflga = true\n[trian]\nlr = 1.0\n[b.c]\nx = 1\n");
  TrainConfig c;
  AllTypes a;
  ASSERT_TRUE(doc.Bind("train", &c).ok());
  ASSERT_TRUE(doc.Bind("a", &a).ok());
  Status s = doc.CheckNoUnknownKeys();
  ASSERT_FALSE(s.ok());
  const std::string& m = s.message();
  EXPECT_CONTAINS(m, "unknown key 'train.stpes' (x.toml:2); did you mean 'train.steps'?");
  EXPECT_CONTAINS(m, "unknown key 'train.zzzzzzzz' (x.toml:3)\n");  // nothing close
  EXPECT_CONTAINS(m, "unknown key 'a.flga' (x.toml:5); did you mean 'a.flag'?");
  EXPECT_CONTAINS(m, "unknown section 'trian' (x.toml:6); did you mean 'train'?");
  EXPECT_CONTAINS(m, "unknown section 'b' (x.toml");
  EXPECT_EQ(std::count(m.begin(), m.end(), '\n'), 4);  // five errors, one per line
}

TEST(ConfigTest, KeyInWrongSectionSuggestsRightOne) {
  ConfigDoc doc = Parse("[a]\nschedule = \"linear\"\n");
  TrainConfig c;
  AllTypes a;
  ASSERT_TRUE(doc.Bind("train", &c).ok());
  ASSERT_TRUE(doc.Bind("a", &a).ok());
  EXPECT_CONTAINS(doc.CheckNoUnknownKeys().message(), "did you mean 'train.schedule'?");
}

TEST(ConfigTest, NestedSections) {
  ConfigDoc doc = Parse("[model]\n[model.lora]\nsteps = 9\n[model.other]\nx = 1\n");
  TrainConfig c;
  ASSERT_TRUE(doc.Bind("model.lora", &c).ok());
  EXPECT_EQ(c.steps, 9);
  EXPECT_EQ(doc.CheckNoUnknownKeys().message(), "unknown section 'model.other' (x.toml:4)");
}

TEST(ConfigTest, SyntaxErrorNamesFileLineAndColumn) {
  StatusOr<ConfigDoc> doc = ConfigDoc::FromTomlString("[train]\nsteps = 1\nlr = = 2\n", "bad.toml");
  ASSERT_FALSE(doc.ok());
  EXPECT_EQ(doc.status().code(), StatusCode::kInvalidArgument);
  EXPECT_CONTAINS(doc.status().message(), "bad.toml:3:");
  EXPECT_CONTAINS(doc.status().message(), "TOML syntax error");
}

TEST(ConfigTest, FromFileAndMissingFile) {
  testing::TempDir dir;
  const std::string path = dir.Join("c.toml");
  std::ofstream(path) << "[train]\nsteps = 3\nlrr = 1\n";
  StatusOr<ConfigDoc> doc = ConfigDoc::FromTomlFile(path);
  ASSERT_TRUE(doc.ok()) << doc.status().ToString();
  TrainConfig c;
  ASSERT_TRUE(doc->Bind("train", &c).ok());
  EXPECT_EQ(c.steps, 3);
  EXPECT_CONTAINS(doc->CheckNoUnknownKeys().message(), "(" + path + ":3)");
  StatusOr<ConfigDoc> missing = ConfigDoc::FromTomlFile(dir.Join("none.toml"));
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_CONTAINS(missing.status().message(), "none.toml");
}

TEST(ConfigTest, OverridesOfEveryType) {
  ConfigDoc doc = Parse("[a]\nbig = 5\nname = \"file\"\n");
  for (const char* o : {"a.flag=true", "a.small=-3", "a.big = 123456789012", "a.f=1.25", "a.d=7",
                        "a.name=\"quoted value\"", "a.ints=[3, 4, 5]", "a.reals=[0.5, 2]",
                        "a.names=[\"y\", \"z\"]"}) {
    ASSERT_TRUE(doc.ApplyOverride(o).ok()) << o;
  }
  AllTypes a;
  Status s = doc.Bind("a", &a);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_TRUE(a.flag);
  EXPECT_EQ(a.small, -3);
  EXPECT_EQ(a.big, 123456789012);
  EXPECT_EQ(a.f, 1.25f);
  EXPECT_EQ(a.d, 7.0);
  EXPECT_EQ(a.name, "quoted value");
  EXPECT_EQ(a.ints, (std::vector<int64_t>{3, 4, 5}));
  EXPECT_EQ(a.reals, (std::vector<double>{0.5, 2.0}));
  EXPECT_EQ(a.names, (std::vector<std::string>{"y", "z"}));
}

TEST(ConfigTest, OverrideBareWordIsStringAndRawTextForStringFields) {
  ConfigDoc doc = Parse("[train]\nschedule = \"cosine\"\n");
  ASSERT_TRUE(doc.ApplyOverride("train.schedule=linear").ok());
  TrainConfig c;
  ASSERT_TRUE(doc.Bind("train", &c).ok());
  EXPECT_EQ(c.schedule, "linear");
  ASSERT_TRUE(doc.ApplyOverride("a.name=123").ok());  // parses as an integer...
  ASSERT_TRUE(doc.ApplyOverride("a.names=[\"x\"]").ok());
  AllTypes a;
  ASSERT_TRUE(doc.Bind("a", &a).ok());
  EXPECT_EQ(a.name, "123");  // ...but a string field takes the text given
}

TEST(ConfigTest, OverrideErrorsNameSetAsSource) {
  ConfigDoc doc = Parse("[train]\nsteps = 4\n");
  ASSERT_TRUE(doc.ApplyOverride("train.steps=0").ok());
  ASSERT_TRUE(doc.ApplyOverride("train.lr=fast").ok());
  ASSERT_TRUE(doc.ApplyOverride("train.lrr=0.1").ok());
  ASSERT_TRUE(doc.ApplyOverride("new.deep.key=1").ok());
  TrainConfig c;
  Status s = doc.Bind("train", &c);
  EXPECT_CONTAINS(s.message(), "'train.steps' (--set): value 0 is out of range");
  EXPECT_CONTAINS(s.message(), "'train.lr' (--set): expected double, found string");
  Status u = doc.CheckNoUnknownKeys();
  EXPECT_CONTAINS(u.message(), "unknown key 'train.lrr' (--set); did you mean 'train.lr'?");
  EXPECT_CONTAINS(u.message(), "unknown section 'new' (--set)");
}

TEST(ConfigTest, MalformedOverrides) {
  ConfigDoc doc = Parse("[train]\nsteps = 4\n");
  EXPECT_EQ(doc.ApplyOverride("train.steps").code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(doc.ApplyOverride("train..steps=1").code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(doc.ApplyOverride("train.steps=").code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(doc.ApplyOverride("train.dims=[1, 2").code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(doc.ApplyOverride("train.s=\"open").code(), StatusCode::kInvalidArgument);
  Status s = doc.ApplyOverride("train.steps.x=1");
  EXPECT_CONTAINS(s.message(), "'train.steps' (x.toml:2) is integer 4, not a table");
}

TEST(ConfigTest, NestedOverrideCreatesTables) {
  ConfigDoc doc = Parse("");
  ASSERT_TRUE(doc.ApplyOverride("model.lora.steps=11").ok());
  TrainConfig c;
  ASSERT_TRUE(doc.Bind("model.lora", &c).ok());
  EXPECT_EQ(c.steps, 11);
  EXPECT_TRUE(doc.CheckNoUnknownKeys().ok());
}

TEST(ConfigTest, DescribeSectionListsEveryField) {
  const std::string help = DescribeSection<TrainConfig>("train");
  EXPECT_CONTAINS(help,
                  "  train.steps     (int64, default 100)  optimizer steps to run "
                  "[>= 1]\n");
  EXPECT_CONTAINS(help,
                  "  train.lr        (double, default 3e-4)  peak learning rate "
                  "[>= 0.0]\n");
  EXPECT_CONTAINS(help,
                  "  train.schedule  (string, default \"cosine\")  learning-rate "
                  "schedule [one of: cosine, linear, constant]\n");
  EXPECT_CONTAINS(help, "  train.dims      (list of int64, default [])  hidden sizes");
  EXPECT_EQ(std::count(help.begin(), help.end(), '\n'), 4);
}

TEST(ConfigTest, ToTomlRoundTripsEveryTypeExactly) {
  std::mt19937_64 gen(20240611);
  std::uniform_real_distribution<double> real(-1e6, 1e6);
  for (int trial = 0; trial < 200; ++trial) {
    AllTypes a;
    a.flag = trial % 2 == 0;
    a.small = static_cast<int32_t>(gen() % 1000);
    a.big = static_cast<int64_t>(gen());
    a.f = static_cast<float>(real(gen) * std::pow(10.0, static_cast<int>(gen() % 40) - 20));
    a.d = std::ldexp(real(gen), static_cast<int>(gen() % 200) - 100);
    if (a.d > 10.0) a.d = -a.d;
    a.name = "q\"uo\\te\n\ttab\x01" + std::to_string(gen());
    a.ints = {static_cast<int64_t>(gen()), -1, 0};
    a.reals = {real(gen) / 7.0, 1e-300, -0.0};
    a.names = {"z", "x"};
    const std::string text = ToToml("sec", a);
    ConfigDoc doc = Parse(text, "roundtrip");
    AllTypes b;
    Status s = doc.Bind("sec", &b);
    ASSERT_TRUE(s.ok()) << s.ToString() << "\n" << text;
    EXPECT_EQ(b.flag, a.flag);
    EXPECT_EQ(b.small, a.small);
    EXPECT_EQ(b.big, a.big);
    EXPECT_EQ(b.f, a.f) << text;
    EXPECT_EQ(b.d, a.d) << text;
    EXPECT_EQ(b.name, a.name);
    EXPECT_EQ(b.ints, a.ints);
    EXPECT_EQ(b.reals, a.reals);
    EXPECT_EQ(b.names, a.names);
    EXPECT_TRUE(doc.CheckNoUnknownKeys().ok());
  }
}

TEST(ConfigTest, ToTomlFormat) {
  TrainConfig c;
  c.dims = {2, 3};
  EXPECT_EQ(ToToml("train", c),
            "[train]\nsteps = 100\nlr = 3e-4\nschedule = \"cosine\"\ndims = [2, 3]\n");
}

}  // namespace
}  // namespace tandem
