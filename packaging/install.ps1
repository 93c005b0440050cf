<#
.SYNOPSIS
Installs standby on this Windows server from the offline bundle, without internet.

.DESCRIPTION
Run it from the unzipped bundle folder, in an elevated PowerShell (Windows PowerShell 5.1 or later):

    powershell -ExecutionPolicy Bypass -File install.ps1 -Config C:\standby\node.toml

Steps, each echoed as it starts:
  1. check every wheel in this folder against MANIFEST.txt (sha256); nothing is installed if one differs
  2. find the Python the bundle was built for (MANIFEST.txt: python, platform), e.g. 64-bit 3.11
  3. create a venv in -Target, or reuse the one there if it has that Python
  4. pip install --no-index --find-links <this folder> standby[windows]==<version>
  5. pywin32's post-install (pywin32_postinstall.py -install -silent from the venv's Scripts)
  6. with -Config: standby service install --config <Config>

The bundle is built by packaging/bundle.py. This script is checked statically by the tests (on Linux);
it runs only here, on Windows.

.PARAMETER Target
Folder for standby's venv. Default: C:\Program Files\standby

.PARAMETER Config
The node's config file. If given, the service is installed with it; if not, only the files are.

.PARAMETER Python
Path to python.exe of the version the bundle was built for. Default: py -3.N, then python on PATH.

.PARAMETER SkipPywin32PostInstall
Do not run pywin32's post-install (it copies pywin32's DLLs into System32 so that services find them).
#>
[CmdletBinding()]
param(
    [string]$Target = 'C:\Program Files\standby',
    [string]$Config = '',
    [string]$Python = '',
    [switch]$SkipPywin32PostInstall
)

Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

function Write-Step {
    param([string]$Message)
    Write-Host "install: $Message"
}

function Stop-Install {
    param([string]$Message)
    throw $Message
}

# Native programs report failure by exit code only; stderr is passed through (pip warns there), never
# turned into a PowerShell error, hence 'Continue' around the call.
function Invoke-Native {
    param([string]$Exe, [string[]]$Arguments)
    Write-Step ('run: "' + $Exe + '" ' + ($Arguments -join ' '))
    $saved = $ErrorActionPreference
    $ErrorActionPreference = 'Continue'
    try {
        & $Exe @Arguments | Out-Host
        $code = $LASTEXITCODE
    } finally {
        $ErrorActionPreference = $saved
    }
    if ($code -ne 0) {
        Stop-Install ('"' + $Exe + '" ' + ($Arguments -join ' ') + " failed with exit code $code")
    }
}

# Returns @(version, platform, executable) of a Python, e.g. @('3.11', 'win-amd64', 'C:\...\python.exe'),
# or $null when it does not start.
function Get-PythonInfo {
    param([string]$Exe, [string[]]$Prefix)
    $probe = "import sys, sysconfig; print('|'.join(['%d.%d' % sys.version_info[:2], sysconfig.get_platform(), sys.executable]))"
    $saved = $ErrorActionPreference
    $ErrorActionPreference = 'Continue'
    try {
        $out = & $Exe @Prefix -c $probe 2>$null
        $code = $LASTEXITCODE
    } catch {
        return $null
    } finally {
        $ErrorActionPreference = $saved
    }
    if ($code -ne 0) {
        return $null
    }
    $line = [string](@($out) | Select-Object -Last 1)
    $parts = $line.Split('|')
    if ($parts.Count -ne 3) {
        return $null
    }
    return ,$parts
}

try {
    $Bundle = $PSScriptRoot
    $ManifestPath = Join-Path $Bundle 'MANIFEST.txt'

    # 1. Every wheel against MANIFEST.txt, before anything else.
    Write-Step "[1/6] checking the wheels in $Bundle against MANIFEST.txt"
    if (-not (Test-Path -LiteralPath $ManifestPath -PathType Leaf)) {
        Stop-Install "MANIFEST.txt is missing from ${Bundle}: unzip the whole bundle and run install.ps1 from it"
    }
    $info = @{}
    $expected = @{}
    $lineNo = 0
    foreach ($raw in [IO.File]::ReadAllLines($ManifestPath)) {
        $lineNo++
        $line = $raw.Trim()
        if ($line -eq '') {
            continue
        }
        if ($line.StartsWith('#')) {
            if ($line -match '^#\s*([a-z]+):\s*(\S+)$') {
                $info[$Matches[1]] = $Matches[2]
            }
            continue
        }
        if ($line -match '^([0-9a-fA-F]{64}) [ *]?([A-Za-z0-9_.+!-]+\.whl)$') {
            $expected[$Matches[2]] = $Matches[1].ToLowerInvariant()
        } else {
            Stop-Install "MANIFEST.txt line ${lineNo} is not '<sha256>  <file>.whl': $line"
        }
    }
    foreach ($key in @('name', 'version', 'python', 'platform')) {
        if (-not $info.ContainsKey($key)) {
            Stop-Install "MANIFEST.txt has no '# ${key}: ...' line: it was not written by packaging/bundle.py"
        }
    }
    if ($expected.Count -eq 0) {
        Stop-Install 'MANIFEST.txt lists no wheels'
    }
    foreach ($file in @($expected.Keys | Sort-Object)) {
        $path = Join-Path $Bundle $file
        if (-not (Test-Path -LiteralPath $path -PathType Leaf)) {
            Stop-Install "$file is listed in MANIFEST.txt but missing from $Bundle"
        }
        $actual = (Get-FileHash -LiteralPath $path -Algorithm SHA256).Hash.ToLowerInvariant()
        if ($actual -ne $expected[$file]) {
            Stop-Install "$file does not match MANIFEST.txt (sha256 $actual, expected $($expected[$file])): copy the zip again"
        }
        Write-Step "  ok $file"
    }
    foreach ($whl in @(Get-ChildItem -LiteralPath $Bundle -Filter '*.whl' -File)) {
        if (-not $expected.ContainsKey($whl.Name)) {
            Stop-Install "$($whl.Name) is in $Bundle but not in MANIFEST.txt: remove it (pip would install it)"
        }
    }
    $Name = $info['name']
    $Version = $info['version']
    $PyVersion = $info['python']
    $PyPlatform = $info['platform'].Replace('_', '-')
    Write-Step "  $($expected.Count) wheels match: $Name $Version for Python $PyVersion $PyPlatform"

    $principal = New-Object Security.Principal.WindowsPrincipal([Security.Principal.WindowsIdentity]::GetCurrent())
    if (-not $principal.IsInRole([Security.Principal.WindowsBuiltInRole]::Administrator)) {
        Stop-Install 'run this from an elevated PowerShell (Run as administrator): it writes to Program Files, System32 and the service list'
    }

    # 2. The Python the wheels were built for: exactly this version and platform (cp311 wheels need 3.11).
    Write-Step "[2/6] looking for Python $PyVersion ($PyPlatform)"
    $candidates = @()
    if ($Python -ne '') {
        if (-not (Test-Path -LiteralPath $Python -PathType Leaf)) {
            Stop-Install "-Python $Python does not exist"
        }
        $candidates += ,@($Python, @())
    } else {
        if (Get-Command 'py' -CommandType Application -ErrorAction SilentlyContinue) {
            $candidates += ,@('py', @("-$PyVersion"))
        }
        foreach ($cmd in @(Get-Command 'python' -CommandType Application -All -ErrorAction SilentlyContinue)) {
            $candidates += ,@($cmd.Source, @())
        }
    }
    $BasePython = $null
    $seen = @()
    foreach ($candidate in $candidates) {
        $label = (@($candidate[0]) + @($candidate[1])) -join ' '
        $found = Get-PythonInfo -Exe $candidate[0] -Prefix $candidate[1]
        if ($null -eq $found) {
            $seen += "$label (does not run)"
            continue
        }
        if ($found[0] -ne $PyVersion -or $found[1] -ne $PyPlatform) {
            $seen += "$label ($($found[0]) $($found[1]))"
            continue
        }
        $BasePython = $found[2]
        break
    }
    if ($null -eq $BasePython) {
        $tried = 'none found'
        if ($seen.Count -gt 0) {
            $tried = $seen -join '; '
        }
        Stop-Install ("no Python $PyVersion ($PyPlatform) found (tried: $tried). Install Python $PyVersion 64-bit " +
            "and pass -Python C:\path\to\python.exe, or rebuild the bundle with packaging/bundle.py --python-version")
    }
    Write-Step "  using $BasePython"

    # 3. The venv in Target; an existing one is reused only if it has the same Python.
    # Relative to the current PowerShell location; no trailing backslash (it would escape the closing quote
    # when PowerShell 5.1 quotes the argument).
    $Target = $ExecutionContext.SessionState.Path.GetUnresolvedProviderPathFromPSPath($Target)
    if ($Target.Length -gt 3) {
        $Target = $Target.TrimEnd('\')
    }
    $VenvPython = Join-Path $Target 'Scripts\python.exe'
    Write-Step "[3/6] venv in $Target"
    if (Test-Path -LiteralPath $VenvPython -PathType Leaf) {
        $venvInfo = Get-PythonInfo -Exe $VenvPython -Prefix @()
        if ($null -eq $venvInfo -or $venvInfo[0] -ne $PyVersion -or $venvInfo[1] -ne $PyPlatform) {
            Stop-Install "$Target holds a venv that is not Python $PyVersion ($PyPlatform): remove it or pass another -Target"
        }
        Write-Step '  reusing the existing venv'
    } else {
        Invoke-Native -Exe $BasePython -Arguments @('-m', 'venv', $Target)
    }

    # 4. standby and its dependencies from this folder only.
    Write-Step "[4/6] installing $Name[windows]==$Version from $Bundle (--no-index)"
    Invoke-Native -Exe $VenvPython -Arguments @('-m', 'pip', '--isolated', '--disable-pip-version-check',
        'install', '--no-index', '--find-links', $Bundle, "$Name[windows]==$Version")

    # 5. pywin32's post-install, when pywin32 is there.
    $PostInstall = Join-Path $Target 'Scripts\pywin32_postinstall.py'
    if ($SkipPywin32PostInstall) {
        Write-Step '[5/6] pywin32 post-install skipped (-SkipPywin32PostInstall)'
    } elseif (Test-Path -LiteralPath $PostInstall -PathType Leaf) {
        Write-Step '[5/6] pywin32 post-install'
        Invoke-Native -Exe $VenvPython -Arguments @($PostInstall, '-install', '-silent')
    } else {
        Write-Step "[5/6] pywin32 post-install not needed ($PostInstall is not there)"
    }

    # 6. The service, if a config was given.
    $StandbyExe = Join-Path $Target 'Scripts\standby.exe'
    if ($Config -ne '') {
        if (-not (Test-Path -LiteralPath $Config -PathType Leaf)) {
            Stop-Install "-Config $Config does not exist: write the node's config first"
        }
        $ConfigPath = (Resolve-Path -LiteralPath $Config).Path
        Write-Step "[6/6] installing the service with $ConfigPath"
        Invoke-Native -Exe $StandbyExe -Arguments @('service', 'install', '--config', $ConfigPath)
    } else {
        Write-Step "[6/6] no -Config given: service not installed. Later: `"$StandbyExe`" service install --config FILE"
    }
    Write-Step "done: $Name $Version in $Target"
    exit 0
} catch {
    Write-Host "install: FAILED: $($_.Exception.Message)" -ForegroundColor Red
    exit 1
}
