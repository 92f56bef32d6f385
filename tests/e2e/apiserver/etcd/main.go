// Command etcd is the etcd server of the e2e (tests/e2e/apiserver/build.sh), built from the server module:
// etcd's own main package lives in its repository's root module, which the module proxy serves with
// local replace lines that a consumer cannot follow, so this calls the same entry point.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
