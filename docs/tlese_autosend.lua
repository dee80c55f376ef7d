-- Orthanc Lua script: forward every mammography image (Modality MG) that Orthanc stores to the tlese node
-- (the DicomModalities entry "tlese"). Images only: the node's own SR (Modality SR) is never sent back, and a
-- late image of a study reaches the node like the others. The node waits for `quiet_seconds` of silence per
-- patient before it predicts. Install: "LuaScripts": ["tlese_autosend.lua"] in orthanc.json.
function OnStoredInstance(instanceId, tags, metadata, origin)
  if tags['Modality'] == 'MG' then
    RestApiPost('/modalities/tlese/store', instanceId)  -- as 'Send to DICOM modality' in the explorer
  end
end
