// Command gitlab-runner is FireRunner's test/demo build of the official
// GitLab Runner: the upstream module (pinned in go.mod) with the shell,
// custom and docker executors. It mirrors upstream main.go minus the executors,
// commands and plugins whose dependencies the Go module proxy refuses (see
// README.md). Production guest images use the official release binary.
package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/KimMachineGun/automemlimit/memlimit"
	"github.com/sirupsen/logrus"
	"github.com/urfave/cli"

	"gitlab.com/gitlab-org/gitlab-runner/commands"
	"gitlab.com/gitlab-org/gitlab-runner/commands/helpers"
	"gitlab.com/gitlab-org/gitlab-runner/common"
	"gitlab.com/gitlab-org/gitlab-runner/executors"
	"gitlab.com/gitlab-org/gitlab-runner/executors/custom"
	"gitlab.com/gitlab-org/gitlab-runner/executors/docker"
	"gitlab.com/gitlab-org/gitlab-runner/executors/shell"
	cli_helpers "gitlab.com/gitlab-org/gitlab-runner/helpers/cli"
	"gitlab.com/gitlab-org/gitlab-runner/helpers/fips"
	"gitlab.com/gitlab-org/gitlab-runner/log"
	"gitlab.com/gitlab-org/gitlab-runner/network"
	"gitlab.com/gitlab-org/gitlab-runner/router"

	_ "gitlab.com/gitlab-org/gitlab-runner/shells"
)

func init() {
	memlimit.SetGoMemLimitWithEnv()
}

func main() {
	defer func() {
		if r := recover(); r != nil {
			// log panics forces exit
			if _, ok := r.(*logrus.Entry); ok {
				os.Exit(1)
			}
			panic(r)
		}
	}()

	executorProviders := newExecutorProviders()
	for name, provider := range executorProviders.All() {
		if err := common.ValidateExecutorProvider(provider); err != nil {
			panic(fmt.Sprintf("Executor %s cannot be registered: %v", name, err))
		}
	}

	fips.Check()
	gitLabClient, clientShutdown, apiRequestsCollector := newClient(executorProviders)
	defer clientShutdown()

	app := cli.NewApp()
	app.Name = filepath.Base(os.Args[0])
	app.Usage = "a GitLab Runner (FireRunner build: shell, custom and docker executors)"
	app.Version = common.AppVersion.ShortLine()
	cli.VersionPrinter = common.AppVersion.Printer
	app.Authors = []cli.Author{{Name: "GitLab Inc.", Email: "support@gitlab.com"}}
	app.Commands = newCommands(gitLabClient, apiRequestsCollector, executorProviders)
	app.CommandNotFound = func(context *cli.Context, command string) {
		logrus.Fatalln("Command", command, "not found.")
	}

	cli_helpers.InitCli()
	cli_helpers.LogRuntimePlatform(app)
	cli_helpers.SetupCPUProfile(app)
	cli_helpers.FixHOME(app)
	cli_helpers.WarnOnBool(os.Args)

	log.ConfigureLogging(app)

	if err := app.Run(os.Args); err != nil {
		logrus.Fatal(err)
	}
}

// newCommands is upstream's list minus `fleeting` and `steps` (their modules
// are refused by the proxy).
func newCommands(n common.Network, apiRequestsCollector *network.APIRequestsCollector, executorProviders executors.Providers) []cli.Command {
	cmds := []cli.Command{
		commands.NewListCommand(),
		commands.NewLintCommand(),
		commands.NewRegisterCommand(n, executorProviders),
		commands.NewResetTokenCommand(n),
		commands.NewRunCommand(n, apiRequestsCollector, executorProviders),
		commands.NewRunSingleCommand(n, executorProviders),
		commands.NewRunnerWrapperCommand(),
		commands.NewUnregisterCommand(n),
		commands.NewVerifyCommand(n),
		helpers.NewArtifactsDownloaderCommand(),
		helpers.NewArtifactsUploaderCommand(),
		helpers.NewCacheArchiverCommand(),
		helpers.NewCacheExtractorCommand(),
		helpers.NewCacheInitCommand(),
		helpers.NewHealthCheckCommand(),
		helpers.NewProbeURLCommand(),
		helpers.NewVerifyVersionCommand(),
		helpers.NewProxyExecCommand(),
		helpers.NewReadLogsCommand(),
	}
	return append(cmds, commands.NewServiceCommands()...)
}

func newClient(executorProviders executors.Providers) (common.Network, func(), *network.APIRequestsCollector) {
	apiRequestsCollector := network.NewAPIRequestsCollector()
	certDir := commands.GetDefaultCertificateDirectory()

	mainClient := network.NewGitLabClient(
		network.WithAPIRequestsCollector(apiRequestsCollector),
		network.WithCertificateDirectory(certDir),
		network.WithExecutorProviderFunc(executorProviders.GetByName),
	)
	rc := router.NewClient(mainClient, certDir, common.AppVersion.UserAgent())
	return rc, rc.Shutdown, apiRequestsCollector
}

func newExecutorProviders() *executors.ProviderRegistry {
	runnerCommand, err := os.Executable()
	if err != nil {
		panic(err)
	}
	return executors.NewProviderRegistry(map[string]common.ExecutorProvider{
		"shell":  shell.NewProvider(runnerCommand),
		"custom": custom.NewProvider("gitlab-runner"),
		"docker": docker.NewProvider(),
	})
}
