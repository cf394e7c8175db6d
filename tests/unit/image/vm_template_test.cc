// Warm-start templates on a real file system: written through a staging
// directory and published by rename, checked before use (a truncated or
// altered file is caught and the template removed), a miss explained by what
// changed, and eviction with the image cache (leases spare a template in use).
#include "image/vm_template.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../../support/temp_dir.h"
#include "absl/strings/str_cat.h"
#include "image/image_cache.h"
#include "nlohmann/json.hpp"

namespace ndq {
namespace {

namespace fs = std::filesystem;
using ::ndq::testing::TempDir;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

// A memfd holding `bytes`: `head` first, zeros after.
UniqueFd MemfdWith(const std::string& head, int64_t bytes) {
  UniqueFd fd(::memfd_create("test", MFD_CLOEXEC));
  EXPECT_TRUE(fd.valid());
  EXPECT_EQ(::ftruncate(fd.get(), bytes), 0);
  EXPECT_EQ(::pwrite(fd.get(), head.data(), head.size(), 0), static_cast<ssize_t>(head.size()));
  return fd;
}

std::string ReadAll(int fd) {
  std::string out;
  char buffer[4096];
  ssize_t n;
  off_t offset = 0;
  while ((n = ::pread(fd, buffer, sizeof buffer, offset)) > 0) {
    out.append(buffer, static_cast<size_t>(n));
    offset += n;
  }
  return out;
}

int64_t DiskUse(const std::string& dir) {
  int64_t bytes = 0;
  for (const auto& entry : fs::directory_iterator(dir)) {
    struct stat st;
    if (::stat(entry.path().c_str(), &st) == 0) bytes += st.st_blocks * 512;
  }
  return bytes;
}

class Templates : public ::testing::Test {
 protected:
  void SetUp() override {
    cache_ = tmp_.path() + "/cache";
    id_ = TemplateIdentity{TemplateOwner{"tenant-a", "shop", "frontend", "web"}, "img-1", "cfg-1", "7.2.22", "pc", 64};
  }
  // Writes and publishes a template for `id` with 4 MiB of RAM.
  absl::Status Save(const TemplateIdentity& id) {
    TemplateStore::Writer writer(store_, id);
    if (absl::Status s = writer.Begin(); !s.ok()) return s;
    UniqueFd ram = MemfdWith("guest memory", 4 << 20);
    UniqueFd state = MemfdWith("QEVM device state", 17);
    UniqueFd disk = MemfdWith("QFI\xfb a frozen layer", 4096);
    for (auto [name, fd] : {std::pair{kTemplateRam, ram.get()}, std::pair{kTemplateState, state.get()},
                            std::pair{kTemplateDisk, disk.get()}}) {
      struct stat st;
      ::fstat(fd, &st);
      if (absl::Status s = writer.CopyFd(name, fd, st.st_size); !s.ok()) return s;
    }
    if (absl::Status s = writer.MakeOverlay(40 << 20); !s.ok()) return s;
    return writer.Publish();
  }
  std::string Staging() const {
    std::string found;
    for (const auto& entry : fs::directory_iterator(cache_)) {
      if (entry.path().filename().string().find(".staging") != std::string::npos) found = entry.path().string();
    }
    return found;
  }

  TempDir tmp_;
  std::string cache_;
  TemplateStore store_{tmp_.path() + "/cache"};
  TemplateIdentity id_;
};

TEST_F(Templates, SavedThenOpenedWithEveryFileChecked) {
  ASSERT_TRUE(Save(id_).ok());
  absl::StatusOr<OpenedTemplate> opened = store_.Open(id_);
  ASSERT_TRUE(opened.ok()) << opened.status();
  EXPECT_EQ(opened->key, id_.Key());
  EXPECT_EQ(opened->dir, cache_ + "/tpl-" + id_.Key());
  EXPECT_EQ(opened->ram_bytes, 4 << 20);
  const std::string ram = ReadAll(opened->ram.get());
  EXPECT_EQ(ram.size(), 4u << 20);
  EXPECT_EQ(ram.substr(0, 12), "guest memory");
  EXPECT_EQ(ReadAll(opened->state.get()).substr(0, 4), "QEVM");
  // The zero runs are holes: the RAM file takes far less than its size.
  struct stat st;
  ASSERT_EQ(::stat((opened->dir + "/ram").c_str(), &st), 0);
  EXPECT_LT(st.st_blocks * 512, 2 << 20);
  EXPECT_EQ(st.st_mode & 0777, 0400u);
  EXPECT_TRUE(fs::exists(opened->dir + "/overlay.qcow2"));
  EXPECT_TRUE(Staging().empty());
}

TEST_F(Templates, KeyCoversEveryPartOfTheIdentity) {
  const std::string key = id_.Key();
  EXPECT_EQ(key.size(), 64u);
  for (auto change : std::vector<std::function<void(TemplateIdentity&)>>{
           [](TemplateIdentity& i) { i.image_digest = "img-2"; }, [](TemplateIdentity& i) { i.config_digest = "x"; },
           [](TemplateIdentity& i) { i.qemu_version = "8.2.0"; }, [](TemplateIdentity& i) { i.machine = "q35"; },
           [](TemplateIdentity& i) { i.memory_mb = 128; }, [](TemplateIdentity& i) { i.owner.task = "api"; },
           // The same job ID in another namespace is another job; so is
           // another job, and another group of the same job.
           [](TemplateIdentity& i) { i.owner.namespace_name = "tenant-b"; },
           [](TemplateIdentity& i) { i.owner.job_id = "shop2"; },
           [](TemplateIdentity& i) { i.owner.task_group = "backend"; }}) {
    TemplateIdentity other = id_;
    change(other);
    EXPECT_NE(other.Key(), key);
  }
}

TEST_F(Templates, AMissSaysWhatChanged) {
  absl::StatusOr<OpenedTemplate> none = store_.Open(id_);
  ASSERT_TRUE(absl::IsNotFound(none.status()));
  EXPECT_EQ(none.status().message(), "no template yet");
  ASSERT_TRUE(Save(id_).ok());
  struct Case {
    std::function<void(TemplateIdentity&)> change;
    const char* said;
  };
  for (const Case& c : std::vector<Case>{
           {[](TemplateIdentity& i) { i.image_digest = "img-2"; }, "the image changed"},
           {[](TemplateIdentity& i) { i.qemu_version = "8.2.0"; }, "QEMU's version changed (the template is from 7.2.22, this is 8.2.0)"},
           {[](TemplateIdentity& i) { i.memory_mb = 128; }, "the VM's configuration changed"},
           {[](TemplateIdentity& i) { i.config_digest = "cfg-2"; }, "the VM's configuration changed"},
           {[](TemplateIdentity& i) { i.machine = "q35"; }, "the machine type changed"}}) {
    TemplateIdentity other = id_;
    c.change(other);
    absl::StatusOr<OpenedTemplate> miss = store_.Open(other);
    ASSERT_TRUE(absl::IsNotFound(miss.status())) << c.said;
    EXPECT_THAT(miss.status().message(), HasSubstr(c.said));
    EXPECT_THAT(miss.status().message(),
                HasSubstr("since the last template of task \"web\" of job \"shop\" (group \"frontend\", "
                          "namespace \"tenant-a\")"));
  }
  // Another job's template is never named, let alone taken: the same
  // config in another namespace is simply "no template yet".
  TemplateIdentity stranger = id_;
  stranger.owner.namespace_name = "tenant-b";
  EXPECT_EQ(store_.Open(stranger).status().message(), "no template yet");
  stranger.image_digest = "img-9";
  EXPECT_EQ(store_.Open(stranger).status().message(), "no template yet");
}

TEST_F(Templates, TemplatesOfAnotherFormatAreRemoved) {
  ASSERT_TRUE(Save(id_).ok());
  TemplateIdentity other = id_;
  other.owner.task = "api";
  ASSERT_TRUE(Save(other).ok());
  // A template written by an earlier build, whose key did not hold the job.
  const std::string old_dir = store_.DirFor(other.Key());
  ::chmod(old_dir.c_str(), 0700);
  const std::string manifest_path = old_dir + "/manifest.json";
  std::string manifest = ReadAll(UniqueFd(::open(manifest_path.c_str(), O_RDONLY)).get());
  const size_t at = manifest.find("\"format\": 2");
  ASSERT_NE(at, std::string::npos) << manifest;
  manifest.replace(at, 11, "\"format\": 1");
  ::unlink(manifest_path.c_str());
  std::ofstream(manifest_path) << manifest;
  ASSERT_THAT(ReadAll(UniqueFd(::open(manifest_path.c_str(), O_RDONLY)).get()), HasSubstr("\"format\": 1"));

  EXPECT_EQ(store_.RemoveOtherFormats(), 1);
  EXPECT_FALSE(fs::exists(old_dir));
  EXPECT_TRUE(store_.Open(id_).ok());
  EXPECT_EQ(store_.RemoveOtherFormats(), 0);
}

TEST_F(Templates, ATruncatedOrAlteredFileFailsItsCheckAndTheTemplateGoes) {
  for (const char* file : {"ram", "state", "disk.qcow2"}) {
    for (bool truncate : {true, false}) {
      ASSERT_TRUE(Save(id_).ok());
      const std::string path = store_.DirFor(id_.Key()) + "/" + file;
      ::chmod(path.c_str(), 0600);
      if (truncate) {
        ASSERT_EQ(::truncate(path.c_str(), 3), 0);
      } else {
        // Same size, one byte changed.
        UniqueFd fd(::open(path.c_str(), O_WRONLY));
        ASSERT_EQ(::pwrite(fd.get(), "X", 1, 1), 1);
      }
      absl::StatusOr<OpenedTemplate> opened = store_.Open(id_);
      ASSERT_TRUE(absl::IsDataLoss(opened.status())) << file << " " << opened.status();
      EXPECT_THAT(opened.status().message(), HasSubstr("failed its check"));
      EXPECT_THAT(opened.status().message(), HasSubstr(file));
      EXPECT_THAT(opened.status().message(), HasSubstr("was removed"));
      EXPECT_FALSE(fs::exists(store_.DirFor(id_.Key())));
      EXPECT_TRUE(Staging().empty());
    }
  }
  // A directory without its manifest (a hand-made one) is not used either.
  fs::create_directories(store_.DirFor(id_.Key()));
  EXPECT_TRUE(absl::IsDataLoss(store_.Open(id_).status()));
  EXPECT_FALSE(fs::exists(store_.DirFor(id_.Key())));
}

TEST_F(Templates, TheFirstPublishWinsAndALostOrDroppedWriterLeavesNothing) {
  ASSERT_TRUE(Save(id_).ok());
  EXPECT_TRUE(absl::IsAlreadyExists(Save(id_)));
  {
    TemplateStore::Writer dropped(store_, id_);
    ASSERT_TRUE(dropped.Begin().ok());
    EXPECT_FALSE(Staging().empty());
  }
  EXPECT_TRUE(Staging().empty());
  EXPECT_TRUE(store_.Open(id_).ok());
}

TEST_F(Templates, AShortSourceIsAnErrorNotAShortTemplate) {
  TemplateStore::Writer writer(store_, id_);
  ASSERT_TRUE(writer.Begin().ok());
  UniqueFd ram = MemfdWith("x", 100);
  absl::Status copied = writer.CopyFd(kTemplateRam, ram.get(), 4096);
  EXPECT_TRUE(absl::IsDataLoss(copied)) << copied;
}

TEST(ContentDigest, FollowsTheContent) {
  UniqueFd a = MemfdWith("same", 8192), b = MemfdWith("same", 8192), c = MemfdWith("diff", 8192);
  absl::StatusOr<std::string> da = ContentDigest(a.get()), db = ContentDigest(b.get()), dc = ContentDigest(c.get());
  ASSERT_TRUE(da.ok() && db.ok() && dc.ok());
  EXPECT_EQ(da->size(), 32u);
  EXPECT_EQ(*da, *db);
  EXPECT_NE(*da, *dc);
  // A write changes the file's ctime, so it is hashed again.
  ASSERT_EQ(::pwrite(a.get(), "diff", 4, 0), 4);
  EXPECT_EQ(*ContentDigest(a.get()), *dc);
}

// A newly launched plugin takes the digests an earlier one kept for files
// still at the same identity, without reading them; a changed file is
// hashed again. Large files only: small ones cost less to hash than to keep.
TEST(ContentDigest, KeptDigestsServeTheNextLaunchForUnchangedFiles) {
  TempDir dir;
  const std::string kept = dir / "digests.json";
  const std::string big = dir / "image";
  {
    std::ofstream out(big);
    out << std::string(kKeptDigestMinBytes, 'x');
  }
  UniqueFd fd(::open(big.c_str(), O_RDWR));
  struct stat st;
  ASSERT_EQ(::fstat(fd.get(), &st), 0);
  // What an earlier launch would have written: this file's identity, with a
  // digest no hash of it gives, so using it shows the file was not read.
  const std::string remembered(32, 'a');
  const nlohmann::json doc = {
      {"format", 1},
      {"xxh3_128",
       {{static_cast<uint64_t>(st.st_dev), static_cast<uint64_t>(st.st_ino), static_cast<int64_t>(st.st_size),
         static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec,
         static_cast<int64_t>(st.st_ctim.tv_sec) * 1000000000 + st.st_ctim.tv_nsec, remembered}}}};
  std::ofstream(kept) << doc.dump();
  KeepDigestsIn(kept);
  EXPECT_EQ(*ContentDigest(fd.get()), remembered);

  // Written to: a new identity, hashed for real, and kept for the next launch.
  ASSERT_EQ(::pwrite(fd.get(), "y", 1, 0), 1);
  const std::string fresh = *ContentDigest(fd.get());
  EXPECT_NE(fresh, remembered);
  EXPECT_EQ(fresh.size(), 32u);
  std::ifstream in(kept);
  const nlohmann::json written = nlohmann::json::parse(in, nullptr, false);
  ASSERT_TRUE(written.is_object());
  bool found = false;
  for (const auto& entry : written["xxh3_128"]) found = found || entry[5] == fresh;
  EXPECT_TRUE(found) << written.dump();

  // A small file is hashed but not kept.
  UniqueFd small = MemfdWith("small", 4096);
  const std::string small_digest = *ContentDigest(small.get());
  EXPECT_EQ(ReadAll(UniqueFd(::open(kept.c_str(), O_RDONLY)).get()).find(small_digest), std::string::npos);
  KeepDigestsIn("");  // no file for the tests after this one
}

TEST_F(Templates, EvictionCountsTemplatesAndSparesLeasedOnes) {
  ASSERT_TRUE(Save(id_).ok());
  TemplateIdentity second = id_;
  second.image_digest = "img-2";
  ASSERT_TRUE(Save(second).ok());
  ImageCache cache(cache_);
  ASSERT_TRUE(cache.Lease(std::string(kTemplatePrefix) + id_.Key(), "task1").ok());
  // Both are older than the image added now.
  for (const std::string& key : {id_.Key(), second.Key()}) {
    const timeval old[2] = {{1000, 0}, {1000, 0}};
    ::utimes(store_.DirFor(key).c_str(), old);
  }
  std::ofstream(cache_ + "/sha256-aa") << std::string(4096, 'i');
  // Room for one template and the image: the unleased template must go.
  absl::StatusOr<std::vector<std::string>> removed = cache.Evict(DiskUse(store_.DirFor(id_.Key())) + 8192, {});
  ASSERT_TRUE(removed.ok()) << removed.status();
  EXPECT_EQ(*removed, std::vector<std::string>{store_.DirFor(second.Key())});
  EXPECT_TRUE(fs::exists(store_.DirFor(id_.Key())));
  cache.Release(store_.DirFor(id_.Key()), "task1");
  removed = cache.Evict(8192, {});
  ASSERT_TRUE(removed.ok());
  EXPECT_EQ(*removed, std::vector<std::string>{store_.DirFor(id_.Key())});
  EXPECT_TRUE(fs::exists(cache_ + "/sha256-aa"));
}

TEST_F(Templates, AStagingLeftByADeadPluginIsRemovedAfterAnHour) {
  // What a writer leaves when its plugin dies: a staging named as Begin names it.
  const std::string staging = absl::StrCat(cache_, "/.tpl-", id_.Key(), ".4242.0.staging");
  fs::create_directories(staging);
  std::ofstream(staging + "/ram") << "partial";
  ImageCache cache(cache_);
  ASSERT_TRUE(cache.Evict(1 << 30, {}).ok());
  EXPECT_TRUE(fs::exists(staging));  // young: maybe still being written
  const timeval old[2] = {{1000, 0}, {1000, 0}};
  ::utimes(staging.c_str(), old);
  ASSERT_TRUE(cache.Evict(1 << 30, {}).ok());
  EXPECT_FALSE(fs::exists(staging));
}

}  // namespace
}  // namespace ndq
