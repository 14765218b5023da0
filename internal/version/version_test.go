package version

import (
	"runtime/debug"
	"testing"
)

func TestGet(t *testing.T) {
	bi := func(settings ...debug.BuildSetting) func() (*debug.BuildInfo, bool) {
		return func() (*debug.BuildInfo, bool) { return &debug.BuildInfo{Settings: settings}, true }
	}
	none := func() (*debug.BuildInfo, bool) { return nil, false }
	for _, tt := range []struct {
		name                string
		version, commit     string
		read                func() (*debug.BuildInfo, bool)
		wantVer, wantCommit string
	}{
		{"stamped", "v0.3.0", "abc123", bi(debug.BuildSetting{Key: "vcs.revision", Value: "fff"}), "v0.3.0", "abc123"},
		{"unstamped, no build info", "", "", none, "dev", ""},
		{"unstamped, vcs info", "", "", bi(debug.BuildSetting{Key: "vcs.revision", Value: "fff"}, debug.BuildSetting{Key: "vcs.modified", Value: "false"}), "dev", "fff"},
		{"unstamped, modified tree", "", "", bi(debug.BuildSetting{Key: "vcs.revision", Value: "fff"}, debug.BuildSetting{Key: "vcs.modified", Value: "true"}), "dev", "fff-dirty"},
		{"version only", "v1.0.0", "", none, "v1.0.0", ""},
	} {
		got := get(tt.version, tt.commit, tt.read)
		if got.Version != tt.wantVer || got.Commit != tt.wantCommit {
			t.Errorf("%s: get = %+v, want version %q commit %q", tt.name, got, tt.wantVer, tt.wantCommit)
		}
		if got.GoVersion == "" || got.Platform == "" {
			t.Errorf("%s: get = %+v: no Go version or platform", tt.name, got)
		}
	}
}
