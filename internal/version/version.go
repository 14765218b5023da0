// Package version holds what a Tandem binary was built from. The build stamps
// it with -ldflags (see the Makefile's LDFLAGS):
//
//	-X github.com/tandem-storage/tandem/internal/version.Version=v0.3.0
//	-X github.com/tandem-storage/tandem/internal/version.Commit=<git sha>
//
// An unstamped binary (go build, go run, go install) reports "dev" and, when
// the Go toolchain recorded it, the VCS revision from its build info.
package version

import (
	"runtime"
	"runtime/debug"
)

// Stamped by -ldflags -X; empty when the build did not set them.
var (
	Version string
	Commit  string
)

// Info is what a binary reports about its build.
type Info struct {
	Version   string `json:"version"`
	Commit    string `json:"commit,omitempty"`
	GoVersion string `json:"goVersion"`
	Platform  string `json:"platform"`
}

// Get returns the binary's build information.
func Get() Info {
	return get(Version, Commit, debug.ReadBuildInfo)
}

func get(v, commit string, read func() (*debug.BuildInfo, bool)) Info {
	info := Info{Version: v, Commit: commit, GoVersion: runtime.Version(), Platform: runtime.GOOS + "/" + runtime.GOARCH}
	if info.Version == "" {
		info.Version = "dev"
	}
	if info.Commit == "" {
		if bi, ok := read(); ok {
			dirty := false
			for _, s := range bi.Settings {
				switch s.Key {
				case "vcs.revision":
					info.Commit = s.Value
				case "vcs.modified":
					dirty = s.Value == "true"
				}
			}
			if info.Commit != "" && dirty {
				info.Commit += "-dirty"
			}
		}
	}
	return info
}
